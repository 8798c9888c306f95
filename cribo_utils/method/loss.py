"""CrIBo's three loss terms and their centring (docs/method.md, Sec. 6).

Notation: ``H(t, q) = -sum_j t_j log q_j``; ``sm`` is the softmax over the O output dimensions;
``C``, ``C_c`` the image and object centres; ``tau(e)``, ``tau_c(e)`` the teacher temperatures of epoch
``e``; ``tau_s``, ``tau_s,c`` the student temperatures (0.1 in every released run).

- Image level (DINO, two global crops plus L >= 0 local crops that only the student sees):
  ``L_img = 1 / (2 (L + 1)) sum_{v=1,2} sum_{u=1..L+2, u != v} mean_b H(T_vb, Q_ub)`` with
  ``T_v = sm((g_t(v) - C) / tau)``, ``log Q_u = log_sm(g_s(u) / tau_s)``; with L = 0 (every released run)
  ``L_img = 1/2 [ mean_b H(T_1b, Q_2b) + mean_b H(T_2b, Q_1b) ]``.
- Cross-view object level (M current objects of this rank):
  ``L_obj = 1/2 [ mean_i H(U^1_i, R^2_i) + mean_i H(U^2_i, R^1_i) ]`` with
  ``U^v = sm((h_t(c^v) - C_c) / tau_c)``, ``log R^v = log_sm(h_s(s^v) / tau_s,c)``.
- Cross-image nearest neighbours (cycle-consistent, masks ``m1``, ``m2``):
  ``L_nn = 1/2 [ sum_i m1_i H(V^1_i, R^2_i) / |m1| + sum_i m2_i H(V^2_i, R^1_i) / |m2| ]`` with
  ``V^v = sm((h_t(q^v_{jv(i)}) - C_c) / tau_c)``; a direction with ``|m_v| = 0`` contributes 0. The
  reference divides both by ``|m1|``, dropping both if ``|m1| = 0`` (docs/differences.md, difference 7).
- ``L = L_img + L_obj + L_nn`` (CrIBo); the ablations keep a prefix of it: ``L = L_img + L_obj``
  (``objective="cross_view"``, CrOC-like, no memory bank) and ``L = L_img`` (``objective="image"``, DINO).
  Terms left out are still computed and returned for the log, with no gradient reaching the total.
- Optional Sinkhorn centring of the object targets (``centering_c="sinkhorn"``, not in the reference):
  ``U^v = sm(h_t(c^v) / tau_c + beta)``, ``V^v = sm(h_t(q^v) / tau_c + beta)`` with ``beta`` the prototype
  potential that balances this step's current objects over the prototypes (:func:`sinkhorn_potential`).

Everything is computed in float32 (inputs are cast at entry; the reference log-softmaxes fp16 logits and
sums fp16 centres: docs/differences.md, difference 13), and a rank with M = 0 objects gives 0 for the
object terms, not NaN, while still taking part in the centre all-reduce.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cribo_utils.method.schedules import teacher_temperature
from cribo_utils.runtime.distributed import all_reduce_max, all_reduce_sum, get_world_size

logger = logging.getLogger(__name__)


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 scalar 0 that stays connected to ``tensor``'s graph (so every parameter gets a gradient)."""
    return tensor.sum() * 0.0


def image_level_loss(
    student_cls: torch.Tensor,
    teacher_cls: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO loss on the [CLS] outputs, cross-view pairs only (docs/method.md, Sec. 6.1).

    ``L_img = 1 / (2 (L + 1)) sum_{v=1,2} sum_{u != v} mean_b H(T_vb, Q_ub)``, ``T_v = sm((t_v - C) / tau)``
    for the two global views the teacher sees, ``log Q_u = log_sm(s_u / tau_s)`` for the 2 + L crops the
    student sees (global views first, then L local crops). With L = 0:
    ``L_img = 1/2 [ mean_b H(T_1b, Q_2b) + mean_b H(T_2b, Q_1b) ]``.

    Args:
        student_cls: ((2 + L)B, O) student head logits, crop-major rows [view 1 batch; view 2 batch;
            local crop 1 batch; ...].
        teacher_cls: (2B, O) teacher head logits of the two global views, same layout.
        center: (1, O) image centre ``C``.
        student_temp: tau_s.
        teacher_temp: tau(e).

    Returns:
        Scalar float32 loss.
    """
    if (
        student_cls.ndim != 2
        or teacher_cls.ndim != 2
        or teacher_cls.shape[0] % 2
        or teacher_cls.shape[0] == 0
        or student_cls.shape[1] != teacher_cls.shape[1]
        or student_cls.shape[0] < teacher_cls.shape[0]
        or student_cls.shape[0] % (teacher_cls.shape[0] // 2)
    ):
        raise ValueError(
            f"image_level_loss: student {tuple(student_cls.shape)} and teacher {tuple(teacher_cls.shape)} "
            "must be ((2 + L)B, O) and (2B, O)."
        )
    batch_size = teacher_cls.shape[0] // 2
    num_crops = student_cls.shape[0] // batch_size
    student_log_probs = F.log_softmax(student_cls.float() / student_temp, dim=-1)
    teacher_probs = F.softmax((teacher_cls.float() - center.float()) / teacher_temp, dim=-1)
    # sum_{v, u != v} sum_b <T_vb, log Q_ub> as dot products over whole blocks (a few operators, not one
    # per pair): with L = 0 the student's views swapped; else all pairs <sum_v T_v, sum_u log Q_u> minus
    # the pairs u = v.
    if num_crops == 2:
        cross = torch.dot(teacher_probs.flatten(), student_log_probs.view(2, -1).flip(0).flatten())
    else:
        all_pairs = torch.dot(
            teacher_probs.view(2, -1).sum(dim=0), student_log_probs.view(num_crops, -1).sum(dim=0)
        )
        cross = all_pairs - torch.dot(teacher_probs.flatten(), student_log_probs[: 2 * batch_size].flatten())
    return cross * (-1.0 / (batch_size * 2 * (num_crops - 1)))


def cross_view_object_loss(
    student_obj: torch.Tensor,
    teacher_obj: torch.Tensor,
    center_c: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-view object loss over this rank's M objects (docs/method.md, Sec. 6.2).

    ``L_obj = 1/2 [ mean_i H(U^1_i, R^2_i) + mean_i H(U^2_i, R^1_i) ]``, ``U^v = sm((t^v - C_c) / tau_c)``,
    ``log R^v = log_sm(s^v / tau_s,c)``. M = 0 gives 0 (connected to the graph).

    Args:
        student_obj: (2, M, Oc) student object logits of view 1 and view 2.
        teacher_obj: (2, M, Oc) teacher object logits.
        center_c: (1, Oc) object centre ``C_c``.
        student_temp: tau_s,c.
        teacher_temp: tau_c(e).

    Returns:
        Scalar float32 loss.
    """
    _check_cross_view_inputs(student_obj, teacher_obj)
    student_log_probs = F.log_softmax(student_obj.float() / student_temp, dim=-1)
    teacher_probs = F.softmax((teacher_obj.float() - center_c.float()) / teacher_temp, dim=-1)
    return _cross_view_term(teacher_probs, student_log_probs.flip(0))


def nearest_neighbour_loss(
    student_obj: torch.Tensor,
    teacher_nn: torch.Tensor,
    nn_masks: torch.Tensor,
    center_c: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-image nearest-neighbour loss, each direction normalised by its own mask (Sec. 6, item 3).

    ``L_nn = 1/2 [ sum_i m1_i H(V^1_i, R^2_i) / |m1| + sum_i m2_i H(V^2_i, R^1_i) / |m2| ]`` with
    ``V^v = sm((h_t(q^v_{jv(i)}) - C_c) / tau_c)`` and ``log R^v = log_sm(s^v / tau_s,c)``; a direction
    with ``|m_v| = 0`` contributes 0. Rejected neighbours are zeroed before the product, so their teacher
    rows (even non-finite ones) affect neither the value nor any gradient.

    Args:
        student_obj: (2, M, Oc) student object logits of view 1 and view 2.
        teacher_nn: (2, M, Oc) teacher logits of the neighbours: row 0 = h_t(q^1_{j1}), row 1 = h_t(q^2_{j2}).
        nn_masks: (2, M) bool cycle-consistency masks m1, m2.
        center_c: (1, Oc) object centre.
        student_temp: tau_s,c.
        teacher_temp: tau_c(e).

    Returns:
        Scalar float32 loss.
    """
    _check_nn_inputs(student_obj, teacher_nn, nn_masks)
    student_log_probs = F.log_softmax(student_obj.float() / student_temp, dim=-1)
    teacher_probs = F.softmax((teacher_nn.float() - center_c.float()) / teacher_temp, dim=-1)
    return _nearest_neighbour_term(teacher_probs, student_log_probs.flip(0), nn_masks)


def _check_cross_view_inputs(student_obj: torch.Tensor, teacher_obj: torch.Tensor) -> None:
    if student_obj.shape != teacher_obj.shape or student_obj.ndim != 3 or student_obj.shape[0] != 2:
        raise ValueError(
            f"cross_view_object_loss: student {tuple(student_obj.shape)} and teacher "
            f"{tuple(teacher_obj.shape)} must both be (2, M, Oc)."
        )


def _check_nn_inputs(student_obj: torch.Tensor, teacher_nn: torch.Tensor, nn_masks: torch.Tensor) -> None:
    if student_obj.shape != teacher_nn.shape or student_obj.ndim != 3 or student_obj.shape[0] != 2:
        raise ValueError(
            f"nearest_neighbour_loss: student {tuple(student_obj.shape)} and teacher_nn "
            f"{tuple(teacher_nn.shape)} must both be (2, M, Oc)."
        )
    if tuple(nn_masks.shape) != tuple(student_obj.shape[:2]) or nn_masks.dtype != torch.bool:
        raise ValueError(
            f"nearest_neighbour_loss: nn_masks must be a (2, {student_obj.shape[1]}) bool tensor, got "
            f"{tuple(nn_masks.shape)} {nn_masks.dtype}."
        )


def _cross_view_term(teacher_probs: torch.Tensor, flipped_log_probs: torch.Tensor) -> torch.Tensor:
    """``L_obj`` from ``U`` (2, M, Oc) and the student's log-probabilities with the views swapped:
    ``-1 / (2M) sum_{v, i} <U^v_i, log R^{3-v}_i>``, one dot product; 0 (in the graph) when M = 0."""
    num_objects = teacher_probs.shape[1]
    if num_objects == 0:
        return _zero_like_graph(flipped_log_probs)
    return torch.dot(teacher_probs.flatten(), flipped_log_probs.flatten()) * (-0.5 / num_objects)


def _nearest_neighbour_term(
    teacher_probs: torch.Tensor, flipped_log_probs: torch.Tensor, nn_masks: torch.Tensor
) -> torch.Tensor:
    """``L_nn`` from ``V`` (2, M, Oc), the student's log-probabilities with the views swapped (direction 1,
    the neighbour found from view 1, is predicted from view 2, and vice versa) and the masks (2, M):
    ``-1/2 sum_v (sum_i m_vi <V^v_i, log R^{3-v}_i>) / max(|m_v|, 1)``, each direction's sum one batched
    dot product. Rejected rows are zeroed first, so that even non-finite ones leak nowhere."""
    kept = torch.where(nn_masks[..., None], teacher_probs, 0.0)
    per_direction = torch.bmm(kept.reshape(2, 1, -1), flipped_log_probs.reshape(2, -1, 1)).view(2)
    mask_sizes = nn_masks.sum(dim=1, dtype=per_direction.dtype).clamp_(min=1)
    return (per_direction / mask_sizes).sum() * -0.5


# Sinkhorn-Knopp normalisations of the object targets per step under ``centering_c="sinkhorn"`` (DINOv2's 3).
SINKHORN_CENTERING_ITERATIONS = 3
# How the object teacher's logits are centred (``--centering_c``).
CENTERINGS = ("mean", "sinkhorn")


def _logsumexp_over_rows(scores: torch.Tensor) -> torch.Tensor:
    """``log sum_r exp(scores[r, k])`` over the rows of every rank: (R, O) -> (O,); -inf where no rank has a
    row. Collective (a max and a sum all-reduce) when distributed."""
    if get_world_size() == 1:
        return torch.logsumexp(scores, dim=0)
    peak = scores.amax(dim=0) if scores.shape[0] else scores.new_full(scores.shape[1:], float("-inf"))
    peak = all_reduce_max(peak)
    finite_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = all_reduce_sum((scores - finite_peak).exp().sum(dim=0))
    return finite_peak + total.log()


@torch.no_grad()
def sinkhorn_potential(scores: torch.Tensor, iterations: int = SINKHORN_CENTERING_ITERATIONS) -> torch.Tensor:
    """Per-prototype shift ``beta`` that makes the targets ``softmax(scores + beta)`` spread evenly over the
    prototypes across this step's objects of all ranks (Sinkhorn-Knopp, as DINOv2 centres its teacher).

    Sinkhorn-Knopp scales ``P_ik = exp(s_ik)`` to ``Q_ik = exp(s_ik + a_i + beta_k)`` whose rows (objects) and
    columns (prototypes) have equal sums, alternating, from ``a = 0``:

        beta_k <- -log sum_i exp(s_ik + a_i)       (every prototype gets the same mass; sum over all ranks)
        a_i    <- -log sum_k exp(s_ik + beta_k)    (every object gets the same mass)

    and, as DINOv2, ends on the row step, so an object's target is its row renormalised: ``softmax_k(s_ik +
    beta_k)`` (the row potential ``a_i`` cancels). Constant offsets (DINOv2's ``1/K`` and ``1/B``) shift every
    ``beta_k`` alike and cancel in the softmax. ``beta`` plays the part of ``-C_c / tau_c`` in the mean
    centring, computed from this step's objects instead of a running mean, and also shifts the neighbours'
    logits (their rows are targets only, not part of the balance).

    Args:
        scores: (R, O) teacher logits over the teacher temperature, ``s = h_t(c) / tau_c``, this rank's rows
            (R may be 0).
        iterations: Sinkhorn-Knopp iterations (column step then row step).
    Returns:
        (1, O) float32 ``beta``; zeros when no rank has a row. Collective when distributed.
    """
    scores = scores.float()
    row_potential = scores.new_zeros(scores.shape[0], 1)
    beta = scores.new_zeros(1, scores.shape[1])
    for _ in range(iterations):
        beta = -_logsumexp_over_rows(scores + row_potential)[None]
        beta = torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))
        row_potential = -torch.logsumexp(scores + beta, dim=1, keepdim=True)
    return beta


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the batch mean of teacher outputs, pooled over all ranks.

    ``C <- m C + (1 - m) (sum_ranks sum_rows t) / (sum_ranks rows)``; the row count is all-reduced too, so
    ranks with different numbers of rows (objects) are weighted correctly. If no rank has a row, ``C``
    is unchanged. Every rank must call it (collective).

    Args:
        center: (1, O) current centre.
        teacher_output: (R, O) teacher logits of this rank (R may be 0).
        momentum: m (0.9).

    Returns:
        (1, O) float32 new centre (the caller copies it into its buffer).
    """
    teacher_output = teacher_output.detach().float().reshape(-1, center.shape[-1])
    rows = teacher_output.shape[0]
    if get_world_size() == 1:  # the row count is known here: nothing to read back from the device
        if rows == 0:
            return center.float().clone()
        batch_center = (teacher_output.sum(dim=0) / rows).to(center.device)[None]
        return center.float() * momentum + batch_center * (1.0 - momentum)
    # One collective for the sum and the count; float32 counts are exact below 2^24 rows. No rank reads
    # the total back: with no row anywhere the centre is kept by a select on the device.
    packed = torch.cat((teacher_output.sum(dim=0), teacher_output.new_full((1,), float(rows))))
    packed = all_reduce_sum(packed)
    total_rows = packed[-1]
    batch_center = (packed[:-1] / total_rows).to(center.device)[None]
    updated = center.float() * momentum + batch_center * (1.0 - momentum)
    return torch.where(total_rows.to(center.device) > 0, updated, center.float())


# The loss terms of each training objective: CrIBo and its two ablations (``--objective``).
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "cribo": ("loss_img", "loss_obj", "loss_nn"),
    "cross_view": ("loss_img", "loss_obj"),
    "image": ("loss_img",),
}


class CrIBoLoss(nn.Module):
    """Total CrIBo loss ``L = L_img + L_obj + L_nn`` with centring (docs/method.md, Sec. 6).

    The terms and their equations are in ``image_level_loss``, ``cross_view_object_loss`` and
    ``nearest_neighbour_loss``. Teacher temperatures follow ``teacher_temperature`` by epoch. The centres
    ``center`` (1, O) and ``center_c`` (1, Oc) (buffers, zero at start) are updated after the loss has
    used the old values: ``C`` from the 2B teacher [CLS] outputs, ``C_c`` from the 2M current teacher
    object outputs (neighbour outputs excluded), both pooled over ranks.

    Args:
        out_dim: O.
        out_dim_c: Oc.
        warmup_teacher_temp: image teacher temperature at epoch 0.
        teacher_temp: image teacher temperature after the warm-up.
        warmup_teacher_temp_c: object teacher temperature at epoch 0.
        teacher_temp_c: object teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: W_e, epochs of the linear warm-up.
        nepochs: total epochs (kept for the record; epochs past it use the final temperatures).
        student_temp: image student temperature tau_s (0.1; the released args' ``student_temp = 1.0`` is a
            dead argument of the reference that the parser maps away, docs/differences.md, difference 8).
        student_temp_c: object student temperature tau_s,c (0.1).
        center_momentum: m of both centre EMAs (0.9).
        objective: which terms make the total, one of :data:`OBJECTIVES`: ``"cribo"`` (all three),
            ``"cross_view"`` (image + cross-view object) or ``"image"`` (image level only).
        centering_c: how the object targets ``U`` and ``V`` are centred, one of :data:`CENTERINGS`:
            ``"mean"`` (DINO's running centre ``C_c``, the reference) or ``"sinkhorn"`` (Sinkhorn-Knopp over
            this step's objects, :func:`sinkhorn_potential`; ``C_c`` is still kept up to date).
    """

    def __init__(
        self,
        out_dim: int,
        out_dim_c: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_c: float,
        teacher_temp_c: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        student_temp_c: float = 0.1,
        center_momentum: float = 0.9,
        objective: str = "cribo",
        centering_c: str = "mean",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: expected one of {tuple(OBJECTIVES)}")
        if centering_c not in CENTERINGS:
            raise ValueError(f"centering_c={centering_c!r}: expected one of {CENTERINGS}")
        self.objective = objective
        self.centering_c = centering_c
        if warmup_teacher_temp_epochs < 0:
            raise ValueError(f"--warmup_teacher_temp_epochs must be >= 0, got {warmup_teacher_temp_epochs}.")
        self.out_dim = out_dim
        self.out_dim_c = out_dim_c
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_c = warmup_teacher_temp_c
        self.teacher_temp_c = teacher_temp_c
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.nepochs = nepochs
        self.student_temp = student_temp
        self.student_temp_c = student_temp_c
        self.center_momentum = center_momentum
        if warmup_teacher_temp_epochs > nepochs:
            logger.warning(
                "warmup_teacher_temp_epochs (%d) > epochs (%d): the teacher temperature never reaches %s.",
                warmup_teacher_temp_epochs,
                nepochs,
                teacher_temp,
            )
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_c", torch.zeros(1, out_dim_c))

    def teacher_temperatures(self, epoch: int) -> tuple[float, float]:
        """``(tau(e), tau_c(e))`` for the image and object paths."""
        return (
            teacher_temperature(
                self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs, epoch
            ),
            teacher_temperature(
                self.warmup_teacher_temp_c, self.teacher_temp_c, self.warmup_teacher_temp_epochs, epoch
            ),
        )

    def forward(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_obj: torch.Tensor,
        teacher_obj: torch.Tensor,
        teacher_nn: torch.Tensor | None,
        nn_masks: torch.Tensor | None,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss with the current centres, then update the centres (collective).

        Args:
            student_cls: ((2 + L)B, O) student [CLS] logits, rows [view 1 batch; view 2 batch; local crops].
            teacher_cls: (2B, O) teacher [CLS] logits of the two global views.
            student_obj: (2, M, Oc) student object logits (view 1, view 2).
            teacher_obj: (2, M, Oc) teacher object logits.
            teacher_nn: (2, M, Oc) teacher logits of the retrieved neighbours, or None (NN loss off).
            nn_masks: (2, M) bool cycle-consistency masks; required when ``teacher_nn`` is given.
            epoch: current epoch e (selects the teacher temperatures).

        Returns:
            ``{"loss", "loss_img", "loss_obj", "loss_nn"}``: float32 scalars; ``loss`` carries the graph.
        """
        if teacher_nn is not None and nn_masks is None:
            raise ValueError("CrIBoLoss: teacher_nn was given without nn_masks.")
        if student_cls.shape[-1] != self.out_dim or student_obj.shape[-1] != self.out_dim_c:
            raise ValueError(
                f"CrIBoLoss: logits have O={student_cls.shape[-1]}, Oc={student_obj.shape[-1]} but the loss "
                f"was built with out_dim={self.out_dim}, out_dim_c={self.out_dim_c} (--out_dim, --out_dim_c)."
            )
        temp, temp_c = self.teacher_temperatures(epoch)
        with torch.autocast(device_type=student_cls.device.type, enabled=False):
            student_cls, teacher_cls = student_cls.float(), teacher_cls.float()
            student_obj, teacher_obj = student_obj.float(), teacher_obj.float()
            loss_img = image_level_loss(student_cls, teacher_cls, self.center, self.student_temp, temp)
            loss_obj, loss_nn = self._object_terms(student_obj, teacher_obj, teacher_nn, nn_masks, temp_c)
            terms = {"loss_img": loss_img, "loss_obj": loss_obj, "loss_nn": loss_nn}
            # Terms outside the objective enter with weight 0: no gradient, and DDP still sees every head.
            kept = OBJECTIVES[self.objective]
            weighted = [value if name in kept else value * 0.0 for name, value in terms.items()]
            loss = weighted[0] + weighted[1] + weighted[2]
            self._update_centres(teacher_cls, teacher_obj.reshape(-1, self.out_dim_c))
        return {"loss": loss, "loss_img": loss_img, "loss_obj": loss_obj, "loss_nn": loss_nn}

    def _object_targets(self, logits: torch.Tensor, current: torch.Tensor, temp_c: float) -> torch.Tensor:
        """Object teacher targets of ``logits`` (..., Oc): ``softmax((l - C_c) / tau_c)`` with the mean
        centring, ``softmax(l / tau_c + beta)`` with Sinkhorn centring, ``beta`` balanced over this step's
        current objects ``current`` (2, M, Oc) of every rank (:func:`sinkhorn_potential`; collective)."""
        if self.centering_c == "sinkhorn":
            beta = sinkhorn_potential(current.reshape(-1, self.out_dim_c).float() / temp_c)
            return F.softmax(logits / temp_c + beta, dim=-1)
        return F.softmax((logits - self.center_c) / temp_c, dim=-1)

    @torch.no_grad()
    def _update_centres(self, teacher_cls: torch.Tensor, teacher_obj: torch.Tensor) -> None:
        """Both centres by :func:`update_center`; on one process, in place as ``C <- C + (1 - m) (mean - C)``
        (``torch.lerp``: the same EMA up to float round-off, three operators a centre instead of six)."""
        for center, outputs in ((self.center, teacher_cls), (self.center_c, teacher_obj)):
            if get_world_size() > 1:
                center.copy_(update_center(center, outputs, self.center_momentum))
            elif outputs.shape[0] > 0:
                center.lerp_(outputs.sum(dim=0, keepdim=True) / outputs.shape[0], 1.0 - self.center_momentum)

    def _object_terms(
        self,
        student_obj: torch.Tensor,
        teacher_obj: torch.Tensor,
        teacher_nn: torch.Tensor | None,
        nn_masks: torch.Tensor | None,
        temp_c: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_obj, L_nn)`` as :func:`cross_view_object_loss` and :func:`nearest_neighbour_loss` give them,
        sharing the student's log-probabilities and one softmax over the current and neighbour logits."""
        _check_cross_view_inputs(student_obj, teacher_obj)
        flipped_log_probs = F.log_softmax(student_obj / self.student_temp_c, dim=-1).flip(0)
        if teacher_nn is None:
            teacher_probs = self._object_targets(teacher_obj, teacher_obj, temp_c)
            zero = torch.zeros((), device=student_obj.device)
            return _cross_view_term(teacher_probs, flipped_log_probs), zero
        assert nn_masks is not None
        _check_nn_inputs(student_obj, teacher_nn, nn_masks)
        logits = torch.cat((teacher_obj, teacher_nn.float()))
        teacher_probs = self._object_targets(logits, teacher_obj, temp_c)
        return (
            _cross_view_term(teacher_probs[:2], flipped_log_probs),
            _nearest_neighbour_term(teacher_probs[2:], flipped_log_probs, nn_masks),
        )
