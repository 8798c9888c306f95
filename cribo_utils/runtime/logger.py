"""Logging set-up for launchers and the JSON-lines metric logs (``log.txt``, ``log_iterations.txt``)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def setup_logging(output_dir: str | None, rank: int = 0, level: int = logging.INFO) -> None:
    """Rank 0 logs to stdout; every rank also logs to ``<output_dir>/logs/rank{r}.log`` when given."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if rank == 0:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    if output_dir:
        log_dir = os.path.join(output_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)


class MetricLogger:
    """Appends one JSON object per line to a log file (the DINO/CrIBo format), on the main process only."""

    def __init__(self, path: str | None, enabled: bool = True, tensorboard_dir: str | None = None) -> None:
        self.path = path
        self.enabled = enabled and path is not None
        self.writer = None
        if self.enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "--tensorboard: the tensorboard package is not installed; continuing without it "
                    "(pip install tensorboard)"
                )
            else:
                self.writer = SummaryWriter(tensorboard_dir)

    def log(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one JSON line (and to TensorBoard if enabled)."""
        if not self.enabled:
            return
        assert self.path is not None
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None and "iteration" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.writer.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


#: DINO's log: one record per epoch (``epoch``, ``train_loss``, ``train_lr``, ``train_wd``, every term).
EPOCH_LOG = "log.txt"
#: The per-iteration records (every ``--log_freq`` iterations), kept apart so that ``log.txt`` reads as
#: DINO's does (earlier versions interleaved both in ``log.txt``; the readers here accept either).
ITERATION_LOG = "log_iterations.txt"


@dataclass
class TrainingLogs:
    """The two JSON-lines logs of a training run: :data:`EPOCH_LOG` and :data:`ITERATION_LOG`."""

    epochs: MetricLogger
    iterations: MetricLogger

    def close(self) -> None:
        self.epochs.close()
        self.iterations.close()


def read_training_log(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a run's logs: :data:`EPOCH_LOG`, then :data:`ITERATION_LOG` if there is one.

    ``output_dir`` is the run's folder or its ``log.txt``. Logs of earlier versions (iteration records
    inside ``log.txt``) read the same. A run stopped before its first epoch ended has only the second.

    Raises:
        FileNotFoundError: neither file is there.
    """
    folder = Path(output_dir)
    if folder.name == EPOCH_LOG and not folder.is_dir():
        folder = folder.parent
    paths = [folder / name for name in (EPOCH_LOG, ITERATION_LOG) if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"{str(folder)!r} holds neither {EPOCH_LOG} nor {ITERATION_LOG}")
    return [record for path in paths for record in read_log(path)]


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every JSON line of a ``log.txt`` in file order (blank lines skipped); used by the tests and
    by the curves figure (:func:`cribo_utils.figures.curves.read_training_curves`).

    Raises:
        ValueError: a line is not JSON (the message names the file and the line number).
    """
    records = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{str(path)!r} line {line_number} is not JSON ({error}); "
                    "expected one JSON object per line"
                ) from error
    return records
