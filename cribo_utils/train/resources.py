"""Memory estimate of a training run, checked before anything large is allocated.

A run that cannot fit should stop at start-up with a message saying what is too big, not be killed by
the OOM killer an hour later (or, worse, after the memory bank has been filled). The estimate, per
process, in bytes:

* memory bank: ``2 * K * Q * D * 4`` (two views, ``K = --n_tokens`` centroids per image, ``Q =
  --queue_size`` images, width ``D``, fp32) plus ``8 Q`` for the per-image cluster counts;
* networks and optimiser: ``4 * (2 P + (1 + s) P_t)`` with ``P`` the parameters of one network (student
  and teacher are the same shape), ``P_t`` the trainable ones (gradients) and ``s`` optimiser states per
  trainable parameter (2 for AdamW's moments, 1 for SGD momentum); the shapes come from building the
  networks on PyTorch's ``meta`` device, which allocates nothing;
* activations kept for the backward pass (rough): ``2B`` images of ``T = 1 + (S/p)^2`` tokens, and ``LB``
  local crops of ``t = 1 + (s/p)^2`` tokens (``L = --local_crops_number``, side ``s``), through ``L_b``
  blocks keep about ``16 T D`` values per image and block (LayerNorm inputs, q/k/v, attention and MLP
  activations; the fused attention kernel keeps no ``T x T`` matrix), in the autocast precision; plus the
  head trunk and output logits of the ``(2 + L)B`` [CLS] tokens and of ``2 M`` objects with ``M = B K / 2``
  in fp32: ``(2 + L)B (4 H + 2 b + 5 O) + 2M (4 H + 2 b + 7 O_c)`` values (hidden width ``H``, bottleneck
  ``b``).
  Fewer clusters are usually valid (4-5 of 32 at initialisation); the margin stands for the temporaries
  the formula leaves out.

Calibration: on an H100, for ViT-S/16 (batch 32, 64, 128 per GPU, fp16 and fp32) and ViT-B/16 (batch 32,
fp16) with the released head sizes (``O = O_c = 65536``, ``K = 32``, ``Q = 25000``), the total is 3-16%
above ``torch.cuda.max_memory_allocated`` of real training steps at epoch 1 with a full bank; with
``K = 8, O_c = 4096`` it is 13% below. The bank and networks terms match the measured static memory to 1%.

The check compares the total with what is free: ``torch.cuda.mem_get_info`` on a GPU; on CPU
``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup limit (SLURM ``--mem``, containers), and
divided among the ``LOCAL_WORLD_SIZE`` processes of the node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from cribo_utils.train.parser import ConfigError
from models.student_teacher import NetworkConfig

logger = logging.getLogger(__name__)

GIB = 2**30
FP32_BYTES = 4
BACKBONE_VALUES_PER_TOKEN_AND_DIM = 16  # kept activations of one pre-norm ViT block, per token and channel
VALID_CLUSTER_FRACTION = 0.5  # objects per image as a fraction of --n_tokens (with margin; module docstring)


class InsufficientMemoryError(ConfigError):
    """The estimated memory of the run exceeds what is available (raised before any model is built)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated memory of one training process, in bytes (see the module docstring for the formulas).

    Attributes:
        bank_bytes: the centroid memory bank.
        networks_bytes: student and teacher weights, student gradients and optimiser state.
        activations_bytes: activations kept for the backward pass (rough).
        parameters: parameters of one network (backbone + head).
        embed_dim: backbone width D.
    """

    bank_bytes: int
    networks_bytes: int
    activations_bytes: int
    parameters: int
    embed_dim: int

    @property
    def total_bytes(self) -> int:
        return self.bank_bytes + self.networks_bytes + self.activations_bytes

    def largest_part(self) -> str:
        """Name of the largest of ``"bank"``, ``"networks"`` and ``"activations"``."""
        sizes = {
            "bank": self.bank_bytes,
            "networks": self.networks_bytes,
            "activations": self.activations_bytes,
        }
        return max(sizes, key=sizes.__getitem__)


@dataclass(frozen=True)
class RunShape:
    """What the estimate depends on: the networks and the training flags of the same names.

    Attributes:
        network: the student / teacher settings (arch, depth, patch and image size, head widths).
        batch_size_per_gpu: images per process B.
        n_tokens: centroids per image K.
        queue_size: images in the memory bank Q.
        optimizer: ``adamw`` (two states per parameter) or ``sgd`` / ``lars`` (one).
        local_crops_number: local crops per image L (student [CLS] only).
        local_crops_size: their side s in pixels.
    """

    network: NetworkConfig
    batch_size_per_gpu: int
    n_tokens: int
    queue_size: int
    optimizer: str
    local_crops_number: int = 0
    local_crops_size: int = 96


@dataclass(frozen=True)
class NetworkSize:
    """Shape facts of one network (student or teacher) as configured.

    Attributes:
        parameters: all parameters (backbone + head).
        trainable: parameters with ``requires_grad`` (the frozen weight-norm gains excluded).
        embed_dim: backbone width D.
        depth: number of transformer blocks L.
        hidden_dim: head trunk width H.
        bottleneck_dim: head bottleneck width b.
    """

    parameters: int
    trainable: int
    embed_dim: int
    depth: int
    hidden_dim: int
    bottleneck_dim: int


def network_size(network: NetworkConfig) -> NetworkSize:
    """Parameters and widths of one network as configured, without allocating it.

    The networks are built on the ``meta`` device (shapes only), so the counts are exact and cost no memory.
    """
    from models.student_teacher import build_student_teacher

    models_logger = logging.getLogger("models")
    level = models_logger.level
    models_logger.setLevel(logging.WARNING)  # the real build logs the sizes; this shape-only one stays quiet
    try:
        with torch.device("meta"):
            student, _ = build_student_teacher(network)
    finally:
        models_logger.setLevel(level)
    head_shapes = {name: tuple(p.shape) for name, p in student.head.named_parameters()}
    return NetworkSize(
        parameters=sum(p.numel() for p in student.parameters()),
        trainable=sum(p.numel() for p in student.parameters() if p.requires_grad),
        embed_dim=int(student.backbone.embed_dim),
        depth=int(student.backbone.depth),
        hidden_dim=int(head_shapes["mlp.0.weight"][0]),  # (H, D)
        bottleneck_dim=int(head_shapes["last_layer.weight_v"][1]),  # (O, b)
    )


def activation_values(run: RunShape, size: NetworkSize) -> tuple[int, int]:
    """Rough number of activation values kept for the backward pass: ``(backbone, heads)``.

    Backbone: ``(2B T + LB t) * L_b * 16 D``; heads: ``(2 + L)B (4H + 2b + 5O) + 2M (4H + 2b + 7Oc)`` with
    ``M = B K / 2`` (module docstring). ``B = --batch_size_per_gpu``, ``T = 1 + (image_size / patch_size)^2``,
    ``t = 1 + (local_crops_size / patch_size)^2``, ``L = --local_crops_number``.
    """
    network = run.network
    images = 2 * run.batch_size_per_gpu
    local_images = run.local_crops_number * run.batch_size_per_gpu
    tokens = 1 + (network.image_size // network.patch_size) ** 2
    local_tokens = 1 + (run.local_crops_size // network.patch_size) ** 2
    all_tokens = images * tokens + local_images * local_tokens
    backbone = all_tokens * size.depth * BACKBONE_VALUES_PER_TOKEN_AND_DIM * size.embed_dim
    objects = 2 * int(run.batch_size_per_gpu * run.n_tokens * VALID_CLUSTER_FRACTION)
    trunk = 4 * size.hidden_dim + 2 * size.bottleneck_dim
    heads = (images + local_images) * (trunk + 5 * network.out_dim) + objects * (
        trunk + 7 * network.out_dim_c
    )
    return backbone, heads


def estimate_training_memory(run: RunShape, activation_bytes: int = FP32_BYTES) -> MemoryEstimate:
    """Estimate the memory one training process needs (module docstring).

    Args:
        run: what the run is made of (:func:`cribo_utils.train.flag_configs.run_shape` of the training flags).
        activation_bytes: bytes per backbone activation value: 2 under fp16/bf16 autocast, else 4.

    Returns:
        The estimate, split into bank, networks and activations.
    """
    size = network_size(run.network)
    bank = 2 * run.n_tokens * run.queue_size * size.embed_dim * FP32_BYTES + 8 * run.queue_size
    optimizer_states = 2 if run.optimizer == "adamw" else 1
    networks = FP32_BYTES * (2 * size.parameters + (1 + optimizer_states) * size.trainable)
    backbone_values, head_values = activation_values(run, size)
    activations = backbone_values * activation_bytes + head_values * FP32_BYTES
    return MemoryEstimate(bank, networks, activations, size.parameters, size.embed_dim)


def _read_key_values(path: str) -> dict[str, int]:
    """``key value [unit]`` lines (``/proc/meminfo``, cgroup ``memory.stat``) as integers."""
    values = {}
    with open(path) as handle:
        for line in handle:
            fields = line.replace(":", " ").split()
            if len(fields) >= 2 and fields[1].isdigit():
                values[fields[0]] = int(fields[1]) * (1024 if fields[2:] == ["kB"] else 1)
    return values


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's cgroup may still allocate (limit - usage + reclaimable page cache), or None.

    Reads cgroup v2 (``memory.max``, ``memory.current``, ``memory.stat: inactive_file``) or v1
    (``memory/memory.limit_in_bytes``, ``memory.usage_in_bytes``, ``total_inactive_file``). ``None`` when
    there is no limit or the files are not readable.
    """
    for limit_file, usage_file, stat_file, cache_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        limit = _read_int(os.path.join(root, limit_file))
        usage = _read_int(os.path.join(root, usage_file))
        if limit is None or usage is None or limit >= 2**60:  # "max" or the v1 "unlimited" sentinel
            continue
        try:
            cache = _read_key_values(os.path.join(root, stat_file)).get(cache_key, 0)
        except OSError:
            cache = 0
        return max(0, limit - usage + cache)
    return None


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Bytes available to this process on ``device`` and where the number comes from; None if unknown.

    GPU: the free memory reported by the driver. CPU: ``MemAvailable`` (Linux), capped by the cgroup
    headroom (:func:`cgroup_headroom`).
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device} of {total / GIB:.1f} GiB"
    try:
        available = _read_key_values("/proc/meminfo")["MemAvailable"]
    except (OSError, KeyError):
        return None
    source = "MemAvailable in /proc/meminfo"
    headroom = cgroup_headroom()
    if headroom is not None and headroom < available:
        available, source = headroom, "left under this job's cgroup memory limit"
    return available, source


def format_estimate(run: RunShape, estimate: MemoryEstimate) -> str:
    """One line: total and its three parts, with the bank formula spelled out."""
    gib = {
        name: getattr(estimate, f"{name}_bytes") / GIB
        for name in ("total", "bank", "networks", "activations")
    }
    bank = (
        f"memory bank {gib['bank']:.1f} GiB = 2 views x --n_tokens {run.n_tokens} x --queue_size "
        f"{run.queue_size} x width {estimate.embed_dim} x 4 bytes"
    )
    networks = (
        f"networks and optimiser {gib['networks']:.1f} GiB for 2 x {estimate.parameters / 1e6:.1f}M "
        "parameters"
    )
    return f"{gib['total']:.1f} GiB ({bank}; {networks}; activations ~{gib['activations']:.1f} GiB)"


_ADVICE = {
    "bank": "lower --queue_size (or --n_tokens)",
    "networks": "use a smaller --arch or lower --out_dim / --out_dim_c",
    "activations": "lower --batch_size_per_gpu (or --image_size), or use --precision bf16",
}


def check_memory(
    run: RunShape,
    device: torch.device,
    activation_bytes: int = FP32_BYTES,
    processes_per_node: int | None = None,
) -> MemoryEstimate:
    """Refuse to start when the estimated memory exceeds what is available.

    Args:
        run: what the run is made of (:func:`cribo_utils.train.flag_configs.run_shape` of the training flags).
        device: where the networks, the bank and the activations will live.
        activation_bytes: bytes per backbone activation value (2 under fp16/bf16 autocast, else 4).
        processes_per_node: processes sharing this machine's RAM on CPU (default: ``LOCAL_WORLD_SIZE``,
            else 1); ignored on GPU (one GPU per process).

    Returns:
        The estimate (also logged).

    Raises:
        InsufficientMemoryError: one line with the needed and available memory and the flag to lower.
    """
    estimate = estimate_training_memory(run, activation_bytes)
    available = available_memory(device)
    logger.info("estimated memory per process: %s", format_estimate(run, estimate))
    if available is None:
        logger.warning("cannot tell how much memory is free on %s; skipping the memory check", device)
        return estimate
    free_bytes, source = available
    sharing = 1
    if device.type != "cuda":
        sharing = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if estimate.total_bytes * sharing > free_bytes:
        per = f" x {sharing} processes on this node" if sharing > 1 else ""
        raise InsufficientMemoryError(
            f"not enough memory: the run needs about {format_estimate(run, estimate)}{per} but only "
            f"{free_bytes / GIB:.1f} GiB is available on {device.type} ({source}); "
            f"{_ADVICE[estimate.largest_part()]}, or pass --check_memory false to start anyway"
        )
    return estimate
