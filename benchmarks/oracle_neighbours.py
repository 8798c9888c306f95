"""Oracle cross-image neighbours: would CrIBo's cross-image term teach the class if its neighbours were right?

A diagnostic of the mechanism, never a recipe (it reads the scenes' masks during training). It trains the
default run (``python main_cribo.py --objective cribo`` plus ``--train_flags``) with one change: the
cycle-consistent retrieval is replaced by an oracle. Each current object's neighbour is the nearest object
*of its own class* among the objects of the last ``--queue_objects`` objects seen (cosine similarity, view 1
searched with view 1 and view 2 with view 2, as the real retrieval does), and every foreground object that
has such a neighbour is accepted (no cycle check). An object's class is the majority class of its view-1
patches, each patch labelled with the majority class of its pixels (background is a class: an object
whose patches are mostly background gets no neighbour). Everything else, the memory bank's schedule
included (the term starts when the real bank is full, at epoch 1), is the default run's.

The run then goes through the ablation's scoring (dense NN on the README's protocol and
``benchmarks/mechanism.py``'s table, including the linear probes), so its row compares with the ablation's
and the attempts' rows in benchmarks/README.md:

    python benchmarks/oracle_neighbours.py --seed 0 --synthetic_seed 1 --root output/oracle

If the class becomes linear in the features (the probes rise well above chance), the cross-image term can
teach it and the retrieval's precision is what holds the real run back; if not, even right neighbours do
not teach it at this budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ablation  # noqa: E402
from benchmarks.harness import machine_info, write_json  # noqa: E402
from cribo_utils.eval.mechanism import object_labels, patch_majority_labels  # noqa: E402
from cribo_utils.method.neighbours import NeighbourResult  # noqa: E402
from data.scene_render import render_scene  # noqa: E402


class OracleQueue:
    """A first-in first-out queue of the last ``capacity`` objects (both views) with their classes, and the
    oracle retrieval against it: for object i of class c > 0, ``j_v(i) = argmax_{r: class_r = c} <c^v_i^,
    q^v_r^>`` in each view v, accepted iff such an r exists."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.view1: torch.Tensor | None = None
        self.view2: torch.Tensor | None = None
        self.classes: torch.Tensor | None = None

    def retrieve(
        self, objects1: torch.Tensor, objects2: torch.Tensor, classes: torch.Tensor
    ) -> NeighbourResult:
        count, dim = objects1.shape
        if self.classes is None:
            none = torch.zeros(count, dtype=torch.bool, device=objects1.device)
            index = torch.full((count,), -1, dtype=torch.long, device=objects1.device)
            zeros = objects1.new_zeros(count, dim)
            return NeighbourResult(zeros, zeros.clone(), none, none.clone(), index, index.clone())
        same = classes[:, None] == self.classes[None, :]
        accepted = (classes > 0) & same.any(dim=1)
        found = []
        for current, stored in ((objects1, self.view1), (objects2, self.view2)):
            scores = F.normalize(current.float(), dim=-1) @ F.normalize(stored.float(), dim=-1).T
            found.append(scores.masked_fill(~same, float("-inf")).argmax(dim=1))
        return NeighbourResult(
            self.view1[found[0]], self.view2[found[1]], accepted, accepted.clone(), found[0], found[1]
        )

    def push(self, objects1: torch.Tensor, objects2: torch.Tensor, classes: torch.Tensor) -> None:
        new = (objects1.detach(), objects2.detach(), classes)
        if self.classes is None:
            kept = new
        else:
            kept = tuple(
                torch.cat(pair) for pair in zip(new, (self.view1, self.view2, self.classes), strict=True)
            )
        self.view1, self.view2, self.classes = (tensor[: self.capacity] for tensor in kept)


@dataclass
class _PictureWithMask:
    """A training item with its class mask, unwrapped by the patched transform (label maps of the views)."""

    picture: Any
    mask: Any


def install(capacity: int, patch: Any = setattr) -> OracleQueue:
    """Patch the training step (retrieval) and the synthetic data (masks travel with the views) with
    ``patch(owner, name, value)`` (``setattr``; a test passes pytest's ``monkeypatch.setattr`` to undo it)."""
    from cribo_utils.train import step
    from data.augmentations import TwoViewTransform
    from data.synthetic import SyntheticScenes

    queue = OracleQueue(capacity)
    state: dict[str, Any] = {}
    get_item, transform_call = SyntheticScenes.__getitem__, TwoViewTransform.__call__
    augment, cluster, pool = (
        step.augment_on_device,
        step.joint_cluster,
        step.object_representations_both_views,
    )

    def item_with_mask(self: SyntheticScenes, index: int) -> tuple[Any, int]:
        picture, label = get_item(self, index)
        _, mask, _ = render_scene(self.scene(index), with_image=False)
        return _PictureWithMask(picture, mask), label

    def transform_with_mask(self: TwoViewTransform, img: Any, label_map: Any = None) -> Any:
        if isinstance(img, _PictureWithMask):
            return transform_call(self, img.picture, label_map=img.mask)
        return transform_call(self, img, label_map=label_map)

    def augment_keeping_labels(
        args: argparse.Namespace, images: torch.Tensor, views: Any, **kwargs: Any
    ) -> Any:
        if kwargs.get("first", 0) == 0:
            if len(views) < 4:
                raise ValueError(
                    "oracle_neighbours: the batch carries no label maps; the oracle reads the synthetic "
                    "scenes' masks (--augment_on device, no dataset named in --train_flags)"
                )
            state["label_maps"] = views[3][:2]  # the two global views' (B, S, S) class maps
            state["patch_size"] = args.patch_size
        return augment(args, images, views, **kwargs)

    def cluster_keeping_result(*args: Any, **kwargs: Any) -> Any:
        state["clusters"] = cluster(*args, **kwargs)
        return state["clusters"]

    def pool_then_retrieve(*args: Any, **kwargs: Any) -> torch.Tensor:
        objects = pool(*args, **kwargs)
        clusters = state["clusters"]
        labels1, labels2 = (
            patch_majority_labels(maps.to(objects.device), state["patch_size"])
            for maps in state["label_maps"]
        )
        n_view1 = labels1.shape[1]
        clusters1, clusters2 = clusters.labels[:, :n_view1], clusters.labels[:, n_view1:]
        classes = object_labels(  # an object's class: the majority class of its view-1 patches
            clusters1, clusters2, labels1, labels2, clusters.valid, clusters.valid.shape[1]
        ).view1
        state["neighbours"] = queue.retrieve(objects[0], objects[1], classes)  # before this step's objects
        queue.push(objects[0], objects[1], classes)
        return objects

    patch(SyntheticScenes, "__getitem__", item_with_mask)
    patch(TwoViewTransform, "__call__", transform_with_mask)
    patch(step, "augment_on_device", augment_keeping_labels)
    patch(step, "joint_cluster", cluster_keeping_result)
    patch(step, "object_representations_both_views", pool_then_retrieve)
    patch(step, "find_cycle_consistent_neighbours", lambda *args, **kwargs: state["neighbours"])
    return queue


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "oracle_neighbours: CrIBo with same-class cross-image neighbours (a diagnostic)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument("--views", default="redrawn", choices=("redrawn", "realistic"))
    parser.add_argument("--queue_objects", type=int, default=1024, help="Objects the oracle searches.")
    parser.add_argument("--train_flags", default="", help="Extra flags of the training run (one string).")
    parser.add_argument("--root", default="output/oracle", help="The run goes to ROOT/VIEWS/cribo/seedS.")
    parser.add_argument("--synthetic_seed", type=int, default=ablation.PROTOCOL_SEED, help="Scenes scored.")
    parser.add_argument("--num_bank", type=int, default=1024)
    parser.add_argument("--num_queries", type=int, default=256)
    parser.add_argument("--out", default=None, help="JSON of the score (default: ROOT/oracle.json).")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    import main_cribo

    torch.multiprocessing.set_start_method("fork", force=True)  # the data workers inherit the patches
    directory = ablation.run_dir(args.root, args.views, "cribo", args.seed)
    flags = ["--synthetic_views", args.views, "--objective", "cribo", "--seed", str(args.seed)]
    flags += ["--output_dir", str(directory), "--log_freq", "100", *args.train_flags.split()]
    install(args.queue_objects)
    began = time.perf_counter()
    main_cribo.main(flags)
    train_seconds = time.perf_counter() - began
    result = ablation.cached_score(directory / "checkpoint.pth", args, {})
    summary = {
        "command": "python benchmarks/oracle_neighbours.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "score": result,
        "train_seconds": train_seconds,
        "machine": machine_info(),
    }
    write_json(args.out or str(Path(args.root) / "oracle.json"), summary)
    print(
        ablation.table(
            {f"{args.views}/cribo": {f"seed{args.seed}": result}},
            lambda run: next(key for key in run if key.startswith("batch_")),
        )
    )
    return summary


if __name__ == "__main__":
    main()
