"""Named dense-NN protocols: the settings of the published numbers, and what each costs.

``eval_dense_nn.py --protocol voc`` (or ``ade20k``) runs the setting of the literature (the Hummingbird
evaluation as open-hummingbird-eval implements it, which the CrIBo numbers follow): 512 px inputs, a memory
of 10,240,000 patch features from two augmented passes over the whole training split, k = 30 neighbours,
softmax temperature 0.02 (docs/dense-nn-protocol.md, A.8). Without ``--protocol`` the dataset's own
protocol applies. A flag given explicitly overrides one value; the result file then records the protocol
*and* the overrides, and is named ``eval_dense_nn_<protocol>_custom.json`` instead of
``eval_dense_nn_<protocol>.json``, so it is never mistaken for the protocol.

RAM: :func:`protocol_ram` evaluates the analytical estimate of
:func:`cribo_utils.eval.dense_nn.plan.estimate_memory_bytes` for the protocol's memory; the run checks the
same estimate against the free RAM before reading any image. Time: the rates that
``benchmarks/bench_dense_nn.py`` measured on 2 CPU cores, extrapolated (:func:`cpu_hours`); no GPU time has
been measured yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Flags a protocol sets (argparse ``dest`` names); each defaults to None so that the protocol decides.
PROTOCOL_FLAGS = (
    "image_size",
    "memory_size",
    "augmentation_epochs",
    "nb_knn",
    "temperature",
    "train_fraction",
    "memory_dtype",
)
#: ViT-S/16 at 512 px on 2 CPU cores (benchmarks/results/bench_dense_nn.json): memory items per second
#: (data, features, sampling, index add) and exact-search queries per second against 1,024,000 entries.
CPU_BUILD_ITEMS_PER_S = 2.0
CPU_EXACT_QUERIES_PER_S_AT_1M = 45.0
MEASURED_IMAGE_SIZE = 512
_MEASURED_MEMORY = 1_024_000


@dataclass(frozen=True)
class DenseNNProtocol:
    """One named protocol.

    Attributes:
        name: ``--protocol`` value.
        dataset: the dataset it is defined on.
        summary: one line for ``--help``.
        image_size: network input side (None: ``--synthetic_image_size``).
        memory_size: M (None: every patch).
        augmentation_epochs: passes over the training images.
        nb_knn: k.
        temperature: softmax temperature beta.
        train_fraction: fraction of the training split in the memory.
        memory_dtype: storage of the memory features.
        num_train_images: images of the training split (for the cost statements).
        num_val_images: images of the validation split.
        num_classes: C.
    """

    name: str
    dataset: str
    summary: str
    image_size: int | None
    memory_size: int | None
    augmentation_epochs: int
    nb_knn: int
    temperature: float
    train_fraction: float
    memory_dtype: str
    num_train_images: int
    num_val_images: int
    num_classes: int

    def value(self, flag: str) -> Any:
        """The protocol's value of a :data:`PROTOCOL_FLAGS` flag."""
        return getattr(self, flag)


PROTOCOLS: dict[str, DenseNNProtocol] = {
    "voc": DenseNNProtocol(
        name="voc",
        dataset="voc",
        summary="Pascal VOC 2012: memory from trainaug (10,582 images), mIoU on val (1,449), 21 classes",
        image_size=512,
        memory_size=10_240_000,
        augmentation_epochs=2,
        nb_knn=30,
        temperature=0.02,
        train_fraction=1.0,
        memory_dtype="fp32",
        num_train_images=10_582,
        num_val_images=1_449,
        num_classes=21,
    ),
    "ade20k": DenseNNProtocol(
        name="ade20k",
        dataset="ade20k",
        summary="ADE20K: memory from training (20,210 images), mIoU on validation (2,000), 150 classes",
        image_size=512,
        memory_size=10_240_000,
        augmentation_epochs=2,
        nb_knn=30,
        temperature=0.02,
        train_fraction=1.0,
        memory_dtype="fp32",
        num_train_images=20_210,
        num_val_images=2_000,
        num_classes=150,
    ),
    "synthetic": DenseNNProtocol(
        name="synthetic",
        dataset="synthetic",
        summary="the built-in synthetic scenes: every patch of 5,000 scenes x 2 passes, mIoU on 500 scenes",
        image_size=None,
        memory_size=None,
        augmentation_epochs=2,
        nb_knn=30,
        temperature=0.02,
        train_fraction=1.0,
        memory_dtype="fp32",
        num_train_images=5_000,
        num_val_images=500,
        num_classes=5,
    ),
}


def apply_protocol(args: Any, protocol: DenseNNProtocol) -> dict[str, Any]:
    """Fill every unset (None) protocol flag of ``args`` from ``protocol``, in place.

    Returns:
        ``{flag: value}`` of the flags given explicitly with another value than the protocol's.
    """
    overrides = {}
    for flag in PROTOCOL_FLAGS:
        value = getattr(args, flag)
        default = protocol.value(flag)
        if flag == "image_size" and default is None:
            default = args.synthetic_image_size
        if value is None:
            setattr(args, flag, default)
        elif value != default:
            overrides[flag] = value
    return overrides


def protocol_ram(
    protocol: DenseNNProtocol,
    dim: int,
    patch_size: int = 16,
    num_workers: int = 7,
    index_on_gpu: bool = False,
) -> dict[str, int]:
    """The RAM estimate of one process running ``protocol`` with exact ``torch`` search (W = 1, batches of
    16 images)."""
    from cribo_utils.eval.dense_nn.plan import estimate_memory_bytes

    image_size = protocol.image_size or 128
    patches = protocol.num_train_images * protocol.augmentation_epochs * (image_size // patch_size) ** 2
    size = min(protocol.memory_size, patches) if protocol.memory_size else patches
    return estimate_memory_bytes(
        size,
        dim,
        protocol.num_classes,
        patch_size,
        "torch",
        memory_dtype=protocol.memory_dtype,
        index_on_gpu=index_on_gpu,
        num_workers=num_workers,
        queries_per_search=16 * (image_size // patch_size) ** 2,
    )


def cpu_hours(protocol: DenseNNProtocol) -> tuple[float, float] | None:
    """(memory build, exact search) hours of ViT-S/16 on 2 CPU cores, from the rates measured at 512 px
    (None for another input size).

    Build: ``images x passes / CPU_BUILD_ITEMS_PER_S``. Search: every validation patch is a query whose cost
    grows with M, ``val images x S^2 / (CPU_EXACT_QUERIES_PER_S_AT_1M x 1,024,000 / M)``.
    """
    if protocol.image_size != MEASURED_IMAGE_SIZE or protocol.memory_size is None:
        return None
    items = protocol.num_train_images * protocol.augmentation_epochs
    queries = protocol.num_val_images * (protocol.image_size // 16) ** 2
    queries_per_s = CPU_EXACT_QUERIES_PER_S_AT_1M * _MEASURED_MEMORY / protocol.memory_size
    return items / CPU_BUILD_ITEMS_PER_S / 3600, queries / queries_per_s / 3600


def protocol_statement(protocol: DenseNNProtocol) -> str:
    """What the protocol sets, its RAM (ViT-S/16 and ViT-B/16) and its time, for ``--help`` and the README."""
    gib = 2.0**30
    small, base = protocol_ram(protocol, 384), protocol_ram(protocol, 768)
    small_gpu = protocol_ram(protocol, 384, index_on_gpu=True)["gpu"]
    base_gpu = protocol_ram(protocol, 768, index_on_gpu=True)["gpu"]
    hours = cpu_hours(protocol)
    memory = f"M = {protocol.memory_size:,}" if protocol.memory_size else "every patch"
    size = f"{protocol.image_size} px" if protocol.image_size else "--synthetic_image_size px"
    time = (
        f"{hours[0]:.1f} h to build the memory and {hours[1]:.0f} h of exact search with ViT-S/16 on 2 CPU "
        "cores (extrapolated from measured rates), not measured yet on a GPU"
        if hours is not None
        else "not measured yet"
    )
    return (
        f"{protocol.name}: {protocol.summary}; {size}, {memory}, {protocol.augmentation_epochs} passes, "
        f"k = {protocol.nb_knn}, beta = {protocol.temperature}, {protocol.memory_dtype} memory. RAM per "
        f"process (estimate, checked at start-up): {small['process'] / gib:.1f} GiB with ViT-S/16, "
        f"{base['process'] / gib:.1f} GiB with ViT-B/16, 7 loader workers included (a GPU holds the index: "
        f"{small_gpu / gib:.1f} / {base_gpu / gib:.1f} GiB of GPU memory; --memory_dtype fp16 halves the "
        f"features). Time: {time}."
    )
