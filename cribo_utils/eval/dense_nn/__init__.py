"""Dense nearest-neighbour retrieval evaluation ("Hummingbird", in-context scene understanding).

Protocol: docs/dense-nn-protocol.md, Part A (Balažević et al., NeurIPS 2023; open-hummingbird-eval). The
backbone is frozen; no parameter is trained.

1. **Memory** (A.3). ``augmentation_epochs`` passes over a fixed, seeded subset of the training images
   (``train_fraction``). Each pass crops every image/mask pair with a paired random resized crop to
   ``input_size`` (area fraction U(0.5, 2.0), draws above 1 rejected; aspect (3/4, 4/3)), jitters the
   image only (brightness, contrast, saturation, hue 0.1, each with p = 0.5) and normalises it. Ignore
   pixels (255) are **relabelled as class 0** before any statistics, as open-hummingbird-eval does (for
   VOC this counts unlabelled boundary pixels as background in the memory labels; the synthetic scenes
   have no ignore pixels). For ADE20K in the standard 150-class convention class 0 is "wall", not a
   background, so there the ignore pixels are dropped instead (``ignore_to_background=False``, the
   ``auto`` choice of ``--memory_ignore``). For a patch with pixel set P (|P| = p^2)::

       y_patch[c] = #{i in P : mask_i = c} / p^2                  (a soft label summing to 1, or less
                                                                   when ignore pixels are dropped)

   With a bounded memory of M entries each image keeps ``n = max(1, M // (images * passes))`` of its
   N = S^2 patches: with ``f_c`` = number of patches of the image that contain class c,
   ``score_patch = (sum_{c present in patch} f_c) * u``, ``u ~ U(0, 1)``, and the n lowest scores are kept
   (patches of classes rare within the image are favoured).
2. **Search** (A.4). Inner product on L2-normalised features (= cosine) over a memory **sharded across
   ranks** (:mod:`cribo_utils.eval.sharded_search`: each rank holds ``M / W`` entries, exact top-k merged
   across ranks). The local search is ``torch`` (exact, chunked matrix products and ``topk`` on the evaluation
   device: the GPU of a GPU node; the default), faiss ``exact`` (``IndexFlatIP``, the former reference)
   or faiss ``ivf`` (``IndexIVFFlat``, approximate, for large memories); faiss is an optional extra
   (``pip install cribo[faiss]``). The search returns the similarities, so only the neighbours' labels
   are read.
3. **Label transfer** (A.5). For a query patch q with neighbours j = 1..k::

       w_j = softmax_j(cos(q, x_j) / beta),      y_hat(q) = sum_j w_j y_j            (k = 30, beta = 0.02)

   The (S, S, C) map is upsampled bilinearly to ``input_size`` and the arg-max class is taken per pixel.
4. **Scoring** (A.6). Validation pairs are resized to ``input_size`` (mask nearest); a confusion matrix is
   accumulated per batch (ignore label excluded) and all-reduced; see :mod:`cribo_utils.eval.metrics`.

Data parallelism: the memory items (pass, image) and the validation images are split into global batches
of ``batch_size`` and each rank takes a contiguous run of whole batches, so every image is processed in
the same batch whatever the world size. All randomness of an item is seeded from (seed, pass, image
index), never from the rank or the loader order, and the memory is assembled on every rank in global
item order; results are therefore identical for 1 and W processes.

Memory layout: features are float32 (``--memory_dtype fp16``: float16, products still in float32),
(M / W, D) per rank inside its shard's index only; labels are kept
on every rank (a neighbour may live on any shard) as at most L (class id, pixel count) pairs per patch
(uint8 or int16), L being the largest number of classes in any stored patch, instead of a dense (M, C)
float32 matrix: about 16 bytes per entry against 4 D for the features.

Modules: :mod:`.config` (the parameters and the CLI mapping), :mod:`.labels` (patch histograms, compact
labels, rarity sampling), :mod:`.plan` (memory plan, training subset, RAM check), :mod:`.datasets`
(seeded memory items, validation pairs), :mod:`.sharding` (per-rank batches, collectives' helpers),
:mod:`.search` (faiss and per-rank local indexes, the memory), :mod:`.predict` (features, label transfer),
:mod:`.memory` (extraction and assembly), :mod:`.scoring` (confusion matrix, the whole protocol),
:mod:`.protocols` (the named protocols and what they cost), :mod:`.cli` (the flags and their resolution)
and :mod:`.runner` (``eval_dense_nn.py``).
"""

from cribo_utils.eval.dense_nn.config import (
    DATASETS,
    DEFAULT_SPLITS,
    INDEX_KINDS,
    DenseNNConfig,
    config_from_args,
    resolve_memory_ignore,
)
from cribo_utils.eval.dense_nn.datasets import (
    MemoryItems,
    ResizedPairs,
    memory_transform,
)
from cribo_utils.eval.dense_nn.labels import (
    PatchLabels,
    patch_class_counts,
    select_memory_patches,
)
from cribo_utils.eval.dense_nn.memory import (
    assemble_memory,
    build_memory,
    extract_memory_shard,
)
from cribo_utils.eval.dense_nn.plan import (
    MemoryPlan,
    check_memory_fits,
    estimate_memory_bytes,
    plan_memory,
    processes_per_node,
    training_subset,
    training_subset_size,
)
from cribo_utils.eval.dense_nn.predict import (
    backbone_attribute,
    dense_feature_dim,
    patch_features,
    predict,
    transfer_labels,
    upsample_argmax,
)
from cribo_utils.eval.dense_nn.runner import (
    build_datasets,
    run_dense_nn,
)
from cribo_utils.eval.dense_nn.scoring import (
    dataset_classes,
    evaluate_dense_nn,
    evaluate_memory,
)
from cribo_utils.eval.dense_nn.search import (
    DenseMemory,
    MemoryShard,
    PatchIndex,
    default_nlist,
)
from cribo_utils.eval.dense_nn.sharding import (
    shard_range,
)

__all__ = [
    "DATASETS",
    "DEFAULT_SPLITS",
    "DenseMemory",
    "DenseNNConfig",
    "INDEX_KINDS",
    "MemoryItems",
    "MemoryPlan",
    "MemoryShard",
    "PatchIndex",
    "PatchLabels",
    "ResizedPairs",
    "assemble_memory",
    "backbone_attribute",
    "build_datasets",
    "build_memory",
    "check_memory_fits",
    "config_from_args",
    "dataset_classes",
    "default_nlist",
    "dense_feature_dim",
    "estimate_memory_bytes",
    "evaluate_dense_nn",
    "evaluate_memory",
    "extract_memory_shard",
    "memory_transform",
    "patch_class_counts",
    "patch_features",
    "plan_memory",
    "predict",
    "processes_per_node",
    "resolve_memory_ignore",
    "run_dense_nn",
    "select_memory_patches",
    "shard_range",
    "training_subset",
    "training_subset_size",
    "transfer_labels",
    "upsample_argmax",
]
