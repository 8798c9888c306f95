"""Logging set-up for launchers and the JSON-lines metric log (``log.txt``)."""

from __future__ import annotations

import json
import logging
import os
import sys
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
    """Appends one JSON object per line to ``log.txt`` (the DINO/CrIBo format), on the main process only."""

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
