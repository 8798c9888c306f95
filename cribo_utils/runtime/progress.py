"""A progress reporter with throughput and ETA: one live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``3725 -> '1:02:05'``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Reports ``done/total``, items per second and ETA.

    On a terminal the line is redrawn in place (rank 0 only); when stdout is not a terminal (SLURM,
    CI, a pipe) a plain log line is written every ``every`` updates so log files stay readable.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        every: int = 10,
        items_per_step: int = 1,
        start: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.every = max(1, every)
        self.items_per_step = items_per_step
        self.start_step = start
        self.done = start
        self.start_time = time.perf_counter()
        self.is_tty = sys.stdout.isatty()

    def rate(self) -> float:
        """Items per second since the start."""
        elapsed = time.perf_counter() - self.start_time
        return (self.done - self.start_step) * self.items_per_step / max(elapsed, 1e-9)

    def eta(self) -> float:
        """Seconds left at the current speed."""
        steps_per_s = self.rate() / self.items_per_step
        return (self.total - self.done) / steps_per_s if steps_per_s > 0 else float("inf")

    def update(self, steps: int = 1, postfix: str = "") -> None:
        self.done += steps
        if not self.enabled:
            return
        line = (
            f"{self.desc} {self.done}/{self.total} | {self.rate():.1f} img/s | "
            f"ETA {format_seconds(self.eta())}" + (f" | {postfix}" if postfix else "")
        )
        if self.is_tty:
            sys.stdout.write("\r" + line[:200].ljust(120))
            sys.stdout.flush()
            if self.done >= self.total:
                sys.stdout.write("\n")
        elif self.done % self.every == 0 or self.done >= self.total:
            logger.info(line)

    def close(self) -> None:
        if self.enabled and self.is_tty and self.done < self.total:
            sys.stdout.write("\n")
