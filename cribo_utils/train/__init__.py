"""Pretraining: the loop (:mod:`.engine`), one step (:mod:`.step`), what it holds (:mod:`.parts`), its data
(:mod:`.loader`), its state on disk (:mod:`.state`), preemption (:mod:`.preemption`), the NaN guards
(:mod:`.health`), when the cross-image loss starts (:mod:`.nn_loss_schedule`) and ``--compile``
(:mod:`.compilation`)."""

from cribo_utils.train.engine import (
    TRAINING_ERRORS,
    average_across_ranks,
    build_training_parts,
    log_run_summary,
    total_across_ranks,
    train_cribo,
    train_one_epoch,
)
from cribo_utils.train.health import (
    NON_FINITE_HINT,
    NonFiniteLossError,
    check_finite_loss,
    check_finite_weights,
)
from cribo_utils.train.loader import augment_on_device, build_pretrain_loader
from cribo_utils.train.nn_loss_schedule import (
    EPOCH_LINE_KEYS,
    check_nn_loss_can_start,
    describe_nn_loss_start,
    epoch_line,
    nn_loss_active,
    nn_loss_epoch_status,
    nn_loss_start_iteration,
    uses_memory_bank,
)
from cribo_utils.train.parts import TrainingParts, autocast, resolve_device, resolve_precision
from cribo_utils.train.preemption import (
    EXIT_PREEMPTED,
    PREEMPTION_SIGNALS,
    Preempted,
    install_preemption_handlers,
    restore_signal_handlers,
    stop_requested,
)
from cribo_utils.train.state import (
    args_as_plain_dict,
    checkpoint_state,
    restore_state,
    save,
    seed_from_released_checkpoint,
    state_digest,
)
from cribo_utils.train.step import StepTimer, training_step

__all__ = [
    "EPOCH_LINE_KEYS",
    "EXIT_PREEMPTED",
    "NON_FINITE_HINT",
    "PREEMPTION_SIGNALS",
    "TRAINING_ERRORS",
    "NonFiniteLossError",
    "Preempted",
    "StepTimer",
    "TrainingParts",
    "args_as_plain_dict",
    "augment_on_device",
    "autocast",
    "average_across_ranks",
    "build_pretrain_loader",
    "build_training_parts",
    "check_finite_loss",
    "check_finite_weights",
    "check_nn_loss_can_start",
    "checkpoint_state",
    "describe_nn_loss_start",
    "epoch_line",
    "install_preemption_handlers",
    "log_run_summary",
    "nn_loss_active",
    "nn_loss_epoch_status",
    "nn_loss_start_iteration",
    "resolve_device",
    "resolve_precision",
    "restore_signal_handlers",
    "restore_state",
    "save",
    "seed_from_released_checkpoint",
    "state_digest",
    "stop_requested",
    "total_across_ranks",
    "train_cribo",
    "train_one_epoch",
    "training_step",
    "uses_memory_bank",
]
