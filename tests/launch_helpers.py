"""Start real ``python main_cribo.py`` processes for the fault-injection tests and watch their progress.

The runs use the tiny configuration of ``tests/test_train.py`` (``TINY``), one thread each, no GPU and
no inherited torchrun/SLURM variables, so a test decides the launch environment itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """The test process's environment without launcher variables, single-threaded, CPU only."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCH_VARIABLES and not key.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def training_command(output_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "main_cribo.py", "--output_dir", str(output_dir), *TINY, *flags]


def start(
    command: list[str], log_prefix: Path, env: dict[str, str] | None = None, new_session: bool = False
) -> subprocess.Popen:
    """Start ``command`` in the repository root; stdout/stderr go to ``<log_prefix>.out`` / ``.err``."""
    with open(f"{log_prefix}.out", "w") as stdout, open(f"{log_prefix}.err", "w") as stderr:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env or child_env(),
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
        )


def output_of(log_prefix: Path) -> tuple[str, str]:
    return Path(f"{log_prefix}.out").read_text(), Path(f"{log_prefix}.err").read_text()


def step_records(output_dir: Path) -> list[dict[str, Any]]:
    """The per-iteration records of ``log_iterations.txt`` (those with a ``loss``), in file order."""
    path = output_dir / "log_iterations.txt"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "loss" in record:
            records.append(record)
    return records


def wait_for_steps(
    process: subprocess.Popen, output_dir: Path, after_iteration: int, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Wait until ``log_iterations.txt`` holds a step record beyond ``after_iteration``; fail if the run
    exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = step_records(output_dir)
        if records and records[-1]["iteration"] > after_iteration:
            return records
        if process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before step {after_iteration + 1}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no training progress past iteration {after_iteration} within {timeout} s")


def wait_for_exit(process: subprocess.Popen, timeout: float) -> int:
    """The exit status; kills the process and fails the test if it runs longer than ``timeout``."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the process did not exit within {timeout} s") from None
