"""DINO's weighted k-NN classifier on frozen [CLS] features (docs/dense-nn-protocol.md, Part B).

For a test feature ``x`` and L2-normalised training features ``f_i`` with labels ``y_i``:

    s_i = <x / ||x||, f_i / ||f_i||>,    N_k(x) = the k training indices with the largest s_i,
    score_c(x) = sum_{i in N_k(x)} exp(s_i / T) * [y_i = c],    prediction = argmax_c score_c(x).

Top-1 is the fraction of test images whose label has the largest score, top-5 whether it is among the
5 largest (reported only with >= 5 classes). Defaults: ``T = 0.07``, ``k in {10, 20, 100, 200}``.

Differences from DINO's ``eval_knn.py`` (all fixes of its defects): the number of classes comes from
the dataset (not 1000); the test set is split into chunks of a fixed *size*, so any number of test
images works; a missing ``--pretrained_weights`` evaluates a random network with a warning instead of
downloading weights; weights load strictly; the top-``max(k)`` neighbours are found once per chunk
and reused for every ``k``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cribo_utils.eval.cli import (
    DefaultsHelpFormatter,
    EvalConfigError,
    add_run_flags,
    check_result_owner,
    check_writable,
    resolve_seeds,
    result_path,
)
from cribo_utils.eval.features import (
    add_eval_data_args,
    build_classification_split,
    build_eval_loader,
    extract_features,
    global_feature_name,
    is_vit,
    num_classes_of,
    resolve_classification_dataset,
    resolve_image_sizes,
    write_results_json,
)
from cribo_utils.runtime import distributed
from cribo_utils.runtime.flags import add_bool_flag
from cribo_utils.weights.checkpoint_formats import add_backbone_args, backbone_from_args

logger = logging.getLogger(__name__)

DEFAULT_NB_KNN = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
#: Similarity-matrix entries per chunk (x 4 bytes): 2^26 -> 256 MiB.
_CHUNK_ELEMENTS = 2**26


def _auto_chunk_size(num_train: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, num_train))


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Weighted-vote class scores ``score_c(x) = sum_{i in N_k(x)} exp(s_i / T) [y_i = c]``.

    Args:
        train_features: (N_train, D), L2-normalised rows.
        train_labels: (N_train,) int64 in [0, C).
        test_features: (N_test, D), L2-normalised rows.
        k: neighbours per test sample, 1 <= k <= N_train.
        temperature: T in ``exp(s / T)``.
        num_classes: C; default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block; default keeps a block near 2^26 entries.
    Returns:
        (N_test, C) float32 scores.
    """
    return knn_scores_multi_k(
        train_features, train_labels, test_features, (k,), temperature, num_classes, chunk_size
    )[k]


def knn_scores_multi_k(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int],
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[int, Tensor]:
    """:func:`knn_scores` for several ``k`` at once, from one top-``max(k)`` search per chunk.

    The top-``K`` list is sorted by decreasing similarity, so its first ``k`` entries are the top-``k``
    neighbours for every ``k <= K``.

    Args:
        train_features: (N_train, D) L2-normalised.
        train_labels: (N_train,) int64 in [0, C).
        test_features: (N_test, D) L2-normalised.
        ks: values of k, each in [1, N_train].
        temperature: T.
        num_classes: C; default ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block.
    Returns:
        ``{k: (N_test, C) scores}``.
    """
    num_train = train_features.shape[0]
    if (
        train_features.ndim != 2
        or test_features.ndim != 2
        or test_features.shape[1] != train_features.shape[1]
    ):
        raise ValueError(
            f"k-NN: expected (N_train, D) and (N_test, D) features, got {tuple(train_features.shape)} "
            f"and {tuple(test_features.shape)}"
        )
    if train_labels.shape != (num_train,):
        raise ValueError(
            f"k-NN: {num_train} training features but labels of shape {tuple(train_labels.shape)}"
        )
    if not ks or min(ks) < 1 or max(ks) > num_train:
        raise ValueError(f"k-NN: every k must lie in [1, {num_train}] (training-set size), got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"k-NN: --temperature must be > 0, got {temperature}")
    train_labels = train_labels.long()
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"k-NN: training labels must lie in [0, {num_classes})")
    chunk_size = _auto_chunk_size(num_train) if chunk_size is None else chunk_size
    max_k = max(ks)
    num_test = test_features.shape[0]
    scores = {k: test_features.new_zeros((num_test, num_classes), dtype=torch.float32) for k in ks}
    for start in range(0, num_test, chunk_size):
        stop = min(start + chunk_size, num_test)
        similarity = test_features[start:stop].float() @ train_features.float().T  # (chunk, N_train)
        top_similarity, top_index = similarity.topk(max_k, dim=1, largest=True, sorted=True)
        votes = (top_similarity / temperature).exp()  # (chunk, max_k)
        neighbour_labels = train_labels[top_index]  # (chunk, max_k)
        for k in ks:
            scores[k][start:stop].scatter_add_(1, neighbour_labels[:, :k], votes[:, :k])
    return scores


def topk_accuracy(scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the ``t`` highest scores, for each ``t`` in ``topk``.

    Args:
        scores: (N, C).
        labels: (N,) int64.
        topk: values of t, each <= C.
    Returns:
        ``{t: 100 * mean_n [labels_n in top-t(scores_n)]}``.
    """
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples to score")
    max_t = max(topk)
    predictions = scores.topk(max_t, dim=1).indices  # (N, max_t)
    hits = predictions == labels.view(-1, 1).to(predictions.device)
    return {t: 100.0 * hits[:, :t].any(dim=1).float().mean().item() for t in topk}


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_NB_KNN,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1 (and top-5 with >= 5 classes) accuracy of the weighted k-NN classifier, in percent.

    Features are L2-normalised here (idempotent for normalised input).

    Args:
        train_features: (N_train, D).
        train_labels: (N_train,) int64.
        test_features: (N_test, D).
        test_labels: (N_test,) int64.
        ks: values of k; each must be <= N_train.
        temperature: T.
        num_classes: C; default ``max(train_labels, test_labels) + 1``.
        chunk_size: test rows per similarity block.
    Returns:
        ``{k: {"top1": ..., "top5": ...}}`` (``top5`` only when C >= 5).
    """
    if num_classes is None:
        num_classes = int(torch.cat([train_labels.flatten(), test_labels.flatten()]).max()) + 1
    train_features = F.normalize(train_features.float(), dim=1, p=2)
    test_features = F.normalize(test_features.float(), dim=1, p=2)
    scores = knn_scores_multi_k(
        train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size
    )
    topk = (1, 5) if num_classes >= 5 else (1,)
    results = {}
    for k in ks:
        accuracy = topk_accuracy(scores[k], test_labels, topk)
        results[k] = {f"top{t}": value for t, value in accuracy.items()}
    return results


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of ``eval_knn.py`` (DINO's names; :mod:`cribo_utils.eval.cli`)."""
    parser = argparse.ArgumentParser("CrIBo weighted k-NN evaluation", formatter_class=DefaultsHelpFormatter)
    add_backbone_args(parser)
    add_eval_data_args(parser)
    group = parser.add_argument_group("k-NN")
    group.add_argument(
        "--nb_knn",
        "--num_neighbours",
        dest="nb_knn",
        default=list(DEFAULT_NB_KNN),
        nargs="+",
        type=int,
        help="Numbers of nearest neighbours (20 is the value usually quoted). Values above the training-set "
        "size are lowered to it (with a warning).",
    )
    group.add_argument("--temperature", default=DEFAULT_TEMPERATURE, type=float, help="Vote temperature T.")
    add_bool_flag(
        group,
        "--use_cuda",
        True,
        "Keep the features on the GPU for the k-NN vote (DINO's flag; false: on the CPU, for training sets "
        "whose features do not fit in GPU memory). Features are extracted on the GPU either way; without "
        "a GPU everything runs on the CPU.",
    )
    group.add_argument(
        "--dump_features",
        default=None,
        type=str,
        help="Folder where the L2-normalised features and labels are saved (DINO's trainfeat.pth, "
        "testfeat.pth, trainlabels.pth, testlabels.pth, plus features.json naming their source).",
    )
    group.add_argument(
        "--load_features",
        default=None,
        type=str,
        help="Folder of features saved by --dump_features (ours or DINO's): no network is run and no image "
        "is read, so --data_path / --dataset_type are refused (the features fixed them).",
    )
    add_run_flags(parser, 128, "eval_knn_<dataset>.json")
    return parser


FEATURE_FILES = ("trainfeat", "testfeat", "trainlabels", "testlabels")
FEATURES_META = "features.json"


def _dump_features(directory: str, tensors: dict[str, Tensor], source: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, tensor in tensors.items():
        torch.save(tensor.cpu(), path / f"{name}.pth")
    write_results_json(source, path / FEATURES_META)
    logger.info("saved features and labels to %s", path)


def load_dumped_features(directory: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The four tensors of a ``--dump_features`` folder and what ``features.json`` says of their source.

    Raises:
        FileNotFoundError: a tensor file is missing (the message names it).
    """
    path = Path(directory)
    tensors = {}
    for name in FEATURE_FILES:
        file = path / f"{name}.pth"
        if not file.is_file():
            raise FileNotFoundError(
                f"--load_features {directory}: {file.name} is missing (expected the "
                f"{', '.join(FEATURE_FILES)}.pth files that --dump_features writes)"
            )
        tensors[name] = torch.load(file, map_location="cpu", weights_only=True)
    meta_file = path / FEATURES_META
    source = json.loads(meta_file.read_text()) if meta_file.is_file() else {"dataset": "unknown"}
    return tensors, source


def _check_knn_flags(args: argparse.Namespace) -> None:
    """One-line errors for flags that cannot work together (before any work)."""
    if args.load_features and (args.data_path or args.dataset):
        raise EvalConfigError(
            f"--load_features {args.load_features} evaluates the features saved there; drop --data_path and "
            "--dataset_type (they were fixed when the features were dumped)"
        )
    if args.load_features and args.dump_features:
        raise EvalConfigError("--load_features and --dump_features together would only copy the features")
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        raise EvalConfigError(f"--nb_knn {args.nb_knn} must be >= 1 and --temperature {args.temperature} > 0")


def _extract_knn_features(
    args: argparse.Namespace, env: distributed.DistEnv
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """L2-normalised [CLS] features and labels of both splits, and what they come from."""
    from data.transforms import eval_transform

    resize, crop = resolve_image_sizes(args)
    transform = eval_transform(resize=resize, crop=crop)
    train_set = build_classification_split(args, "train", transform)
    val_set = build_classification_split(args, "val", transform)
    sizes = len(train_set), len(val_set)  # type: ignore[arg-type]
    logger.info("k-NN on %s: %d train / %d val images", args.dataset, *sizes)
    model = backbone_from_args(args)
    model.to(env.device)
    tensors = {}
    for name, dataset in (("train", train_set), ("test", val_set)):
        loader = build_eval_loader(dataset, args.batch_size_per_gpu, args.num_workers)
        raw, tensors[f"{name}labels"] = extract_features(model, loader, env.device, kind="cls")
        tensors[f"{name}feat"] = F.normalize(raw, dim=1, p=2)
    source = {
        "features": f"L2-normalised {global_feature_name(model)}",
        "pretrained_weights": args.pretrained_weights,
        "checkpoint_key": args.checkpoint_key,
        "arch": args.arch,
        "patch_size": args.patch_size if is_vit(model) else None,
        "dataset": args.dataset,
        "data_path": args.data_path if args.dataset != "synthetic" else None,
        "resize": resize,
        "image_size": crop,
        "num_classes": num_classes_of(train_set, [tensors["trainlabels"], tensors["testlabels"]]),
    }
    return tensors, source


def run_knn(args: argparse.Namespace) -> dict[str, Any]:
    """Extract [CLS] features data-parallel (or load them), run the weighted k-NN and write the JSON.

    Args:
        args: flags from :func:`get_args_parser`.
    Returns:
        The results dict written to the result file (identical on every rank).
    """
    resolve_seeds(args)
    _check_knn_flags(args)
    if args.load_features:
        tensors, source = load_dumped_features(args.load_features)
        source["loaded_from"] = args.load_features
    else:
        resolve_classification_dataset(args, "eval_knn.py")
    dataset = source["dataset"] if args.load_features else args.dataset
    output = check_writable(result_path(args, f"eval_knn_{dataset}.json"))
    owner = source if args.load_features else vars(args)
    check_result_owner(output, owner.get("pretrained_weights"), owner.get("checkpoint_key", "teacher"))
    if args.dump_features:
        check_writable(Path(args.dump_features) / FEATURES_META)

    env = distributed.init_distributed(dist_url=args.dist_url)
    start = time.time()
    if not args.load_features:
        tensors, source = _extract_knn_features(args, env)
    num_train = tensors["trainfeat"].shape[0]
    labels = torch.cat([tensors["trainlabels"].flatten(), tensors["testlabels"].flatten()])
    num_classes = source.get("num_classes") or int(labels.max()) + 1
    ks = sorted({min(k, num_train) for k in args.nb_knn})
    if ks != sorted(set(args.nb_knn)):
        logger.warning("--nb_knn %s lowered to %s: only %d training images", args.nb_knn, ks, num_train)
    vote_device = env.device if args.use_cuda else torch.device("cpu")
    accuracies = knn_classify(
        tensors["trainfeat"].to(vote_device),
        tensors["trainlabels"].to(vote_device),
        tensors["testfeat"].to(vote_device),
        tensors["testlabels"].to(vote_device),
        ks=ks,
        temperature=args.temperature,
        num_classes=num_classes,
    )
    for k, accuracy in accuracies.items():
        logger.info("%d-NN classifier result: %s", k, ", ".join(f"{n} {v:.2f}" for n, v in accuracy.items()))

    results = {
        "protocol": "DINO weighted k-NN on " + source.get("features", "loaded features"),
        **{key: value for key, value in source.items() if key not in ("features", "num_classes")},
        "temperature": args.temperature,
        "nb_knn": ks,
        "num_train": num_train,
        "num_val": int(tensors["testfeat"].shape[0]),
        "num_classes": num_classes,
        "world_size": env.world_size,
        "results": {str(k): accuracy for k, accuracy in accuracies.items()},
        "elapsed_s": round(time.time() - start, 2),
        "output_json": str(output),
    }
    if distributed.is_main_process():
        if args.dump_features:
            _dump_features(args.dump_features, tensors, source)
        write_results_json(results, output)
    distributed.barrier()
    return results
