"""Student/teacher networks (backbone + CrIBo head) and the teacher's exponential moving average.

State-dict keys are ``backbone.*`` and ``head.*`` (docs/method.md, Sec. 10): 160 keys for a 12-block ViT
with the default head, plus ``module.`` on the DDP-wrapped student.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from models import build_backbone
from models.head import HEAD_BOTTLENECK_DIM, HEAD_HIDDEN_DIM, HEAD_NLAYERS, CrIBoHead
from models.object_pooling import object_representations_both_views
from models.vision_transformer import DropPath, VisionTransformer

logger = logging.getLogger(__name__)

DDP_PREFIX = "module."


class CrIBoNetwork(nn.Module):
    """A ViT backbone and a CrIBo head (docs/method.md, Sec. 1 and 5).

    The student runs through :meth:`forward` once per step (so DDP sees one forward using every
    parameter); the teacher's head is applied to already computed backbone outputs with
    :meth:`head_outputs`. Shapes: B images per view, N patches, D width, K clusters, M valid
    objects, O = out_dim, Oc = out_dim_c.

    Args:
        backbone: the vision transformer.
        head: the projection head; its input width must equal ``backbone.embed_dim``.
    """

    def __init__(self, backbone: VisionTransformer, head: CrIBoHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        images: Tensor,
        assign1: Tensor,
        assign2: Tensor,
        valid: Tensor,
        local_images: Tensor | None = None,
        valid_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Student outputs for both views, pooled with the teacher's cluster assignment.

        ``s^v_{b,k} = sum_n A^v[b, n, k] * t^v[b, n]`` (mean of the student patch tokens of cluster k in
        view v, valid clusters only, image by image), then ``head.forward_c(s^v)``; the [CLS] tokens go
        through ``head.forward``. The [CLS] tokens and the objects of both views share one trunk call
        (:meth:`CrIBoHead.forward_both`). Local crops (DINO's multi-crop) only give [CLS] logits, appended
        after those of the global views.

        Args:
            images: (2B, C, H, W), view-1 batch then view-2 batch.
            assign1: (B, N, K) column-normalised assignment of view 1 (from the teacher).
            assign2: (B, N, K) same for view 2.
            valid: (B, K) bool, clusters present in both views.
            local_images: (LB, C, h, w) local crops, crop-major (crop 1 batch, crop 2 batch, ...), or None.
            valid_index: optional (2M,) flat indices of the valid clusters of both views
                (``models.object_pooling.valid_object_index(valid, views=2)``), to skip reading M back
                from the device.
        Returns:
            ``(cls_logits, object_logits)`` of shapes ((2 + L)B, O) and (2, M, Oc), M = ``valid.sum()``.
        """
        batch_size = assign1.shape[0]
        if images.shape[0] != 2 * batch_size:
            raise ValueError(
                f"CrIBoNetwork.forward: expected 2 * {batch_size} images (two views of the {batch_size} "
                f"images in assign1), got {images.shape[0]}"
            )
        cls_tokens, patch_tokens = self.backbone.forward_features(images)
        objects = object_representations_both_views(patch_tokens, assign1, assign2, valid, valid_index)
        if local_images is not None and local_images.shape[0] > 0:
            local_cls, _ = self.backbone.forward_features(local_images)
            cls_tokens = torch.cat((cls_tokens, local_cls))
        cls_logits, object_logits = self.head.forward_both(cls_tokens, objects.flatten(0, 1))
        return cls_logits, rearrange(object_logits, "(v m) o -> v m o", v=2)

    def head_outputs(
        self,
        cls_tokens: Tensor,
        objects: tuple[Tensor, Tensor],
        neighbours: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Head projections of backbone-space vectors (the teacher side of the step).

        ``head.forward`` on the [CLS] tokens; ``head.forward_c`` on the objects of both views and,
        when given, on the retrieved neighbours; [CLS] tokens and objects in one trunk call.

        Args:
            cls_tokens: (2B, D) [CLS] tokens.
            objects: ``(objects1, objects2)``, each (M, D).
            neighbours: ``(neighbours1, neighbours2)``, each (M, D), or None.
        Returns:
            ``(cls_logits (2B, O), object_logits (2, M, Oc), neighbour_logits (2, M, Oc) or None)``.
        """
        vectors = [*objects] if neighbours is None else [*objects, *neighbours]
        if any(vector.shape != objects[0].shape for vector in vectors):
            raise ValueError(
                "CrIBoNetwork.head_outputs: objects and neighbours must all be (M, D) with the same M, got "
                f"{[tuple(vector.shape) for vector in vectors]}"
            )
        cls_logits, object_logits = self.head.forward_both(cls_tokens, *vectors)
        logits = rearrange(object_logits, "(v m) o -> v m o", v=len(vectors))
        neighbour_logits = None if neighbours is None else logits[2:]
        return cls_logits, logits[:2], neighbour_logits


@dataclass(frozen=True)
class NetworkConfig:
    """What :func:`build_student_teacher` needs: the training flags of the same names.

    Attributes:
        arch: ViT size (``vit_tiny`` ... ``vit_large``).
        patch_size: ViT patch size p.
        out_dim: image-level head output width O.
        out_dim_c: object-level head output width O_c.
        drop_path_rate: stochastic depth of the student.
        image_size: side of the global crops (sets the positional table).
        depth: number of blocks (None: the architecture's).
        use_bn_in_head: BatchNorm in the head MLP.
        head_hidden_dim: width of the head's hidden layers.
        head_nlayers: Linear layers of the head's trunk.
        head_bottleneck_dim: width of the head's L2-normalised bottleneck.
        norm_last_layer: weight-normalised last layer with frozen gain.
        grad_checkpointing: recompute the student's blocks in backward.
    """

    arch: str
    patch_size: int
    out_dim: int
    out_dim_c: int
    drop_path_rate: float = 0.1
    image_size: int = 224
    depth: int | None = None
    use_bn_in_head: bool = False
    head_hidden_dim: int = HEAD_HIDDEN_DIM
    head_nlayers: int = HEAD_NLAYERS
    head_bottleneck_dim: int = HEAD_BOTTLENECK_DIM
    norm_last_layer: bool = True
    grad_checkpointing: bool = False


def build_student_teacher(config: NetworkConfig) -> tuple[CrIBoNetwork, CrIBoNetwork]:
    """Build the student and a teacher with identical initial weights.

    The teacher is a copy of the student with stochastic depth and checkpointing switched off, no
    gradients and eval mode.

    Args:
        config: the networks' settings (:func:`cribo_utils.train.flag_configs.network_config` builds it
            from the training flags).
    Returns:
        ``(student, teacher)``.
    """
    backbone = build_backbone(
        config.arch,
        patch_size=config.patch_size,
        drop_path_rate=config.drop_path_rate,
        img_size=config.image_size,
        depth=config.depth,
    )
    head = CrIBoHead(
        backbone.embed_dim,
        config.out_dim,
        config.out_dim_c,
        use_bn=config.use_bn_in_head,
        norm_last_layer=config.norm_last_layer,
        hidden_dim=config.head_hidden_dim,
        nlayers=config.head_nlayers,
        bottleneck_dim=config.head_bottleneck_dim,
    )
    student = CrIBoNetwork(backbone, head)
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    teacher.requires_grad_(False)
    teacher.eval()
    if config.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)
    logger.info(
        "Built student and teacher %s/%d: backbone %.1fM parameters, head %.1fM parameters",
        config.arch,
        config.patch_size,
        sum(p.numel() for p in backbone.parameters()) / 1e6,
        sum(p.numel() for p in head.parameters()) / 1e6,
    )
    return student, teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Exponential moving average of the student into the teacher, paired by parameter name.

    ``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter, frozen ones included
    (docs/method.md, Sec. 9). Names are compared after stripping one leading ``module.`` (DDP), so a
    wrapped student pairs with a plain teacher. Buffers, where any exist (BatchNorm in the head),
    follow the same average when floating point and are copied otherwise (``num_batches_tracked``),
    because the teacher runs in eval mode and never updates its own statistics.

    Args:
        student: the (possibly DDP-wrapped) student.
        teacher: the teacher, updated in place.
        momentum: m in [0, 1]; m = 1 leaves the teacher unchanged.
    Raises:
        ValueError: if m is outside [0, 1] or the two networks differ in names or shapes.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"update_teacher: momentum must lie in [0, 1], got {momentum}")
    student_params, teacher_params = _paired(
        student.named_parameters(), teacher.named_parameters(), "parameter"
    )
    if teacher_params:
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    student_buffers, teacher_buffers = _paired(student.named_buffers(), teacher.named_buffers(), "buffer")
    floating = [i for i, target in enumerate(teacher_buffers) if target.is_floating_point()]
    if floating:
        torch._foreach_mul_([teacher_buffers[i] for i in floating], momentum)
        torch._foreach_add_(
            [teacher_buffers[i] for i in floating],
            [student_buffers[i] for i in floating],
            alpha=1.0 - momentum,
        )
    others = [i for i in range(len(teacher_buffers)) if i not in floating]
    if others:
        torch._foreach_copy_([teacher_buffers[i] for i in others], [student_buffers[i] for i in others])


def _strip_ddp_prefix(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    return {name.removeprefix(DDP_PREFIX): tensor for name, tensor in named}


def _paired(
    student_named: Iterable[tuple[str, Tensor]], teacher_named: Iterable[tuple[str, Tensor]], kind: str
) -> tuple[list[Tensor], list[Tensor]]:
    """Student and teacher tensors in the teacher's order, after checking names and shapes agree."""
    student_by_name = _strip_ddp_prefix(student_named)
    teacher_by_name = _strip_ddp_prefix(teacher_named)
    if student_by_name.keys() != teacher_by_name.keys():
        only_student = sorted(student_by_name.keys() - teacher_by_name.keys())
        only_teacher = sorted(teacher_by_name.keys() - student_by_name.keys())
        raise ValueError(
            f"update_teacher: student and teacher {kind} names differ; only in student: {only_student[:5]}"
            f" ({len(only_student)} total), only in teacher: {only_teacher[:5]} ({len(only_teacher)} total). "
            "Build both with build_student_teacher from the same flags."
        )
    names = list(teacher_by_name)
    mismatched = [n for n in names if student_by_name[n].shape != teacher_by_name[n].shape]
    if mismatched:
        raise ValueError(
            f"update_teacher: {kind} shapes differ between student and teacher for {mismatched[:5]}"
        )
    # No .detach(): the update runs under no_grad, and one view per tensor and step would be dispatched.
    return [student_by_name[n] for n in names], [teacher_by_name[n] for n in names]
