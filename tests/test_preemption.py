"""Preemption with real signals: SIGUSR1 / SIGTERM -> checkpoint at the next iteration, exit 75, resume.

The runs are real ``python main_cribo.py`` processes (tests/launch_helpers.py); ``run_slurm.sh`` runs under
a fake ``srun`` (runs the command in the foreground) and a fake ``scontrol`` (records its arguments).
Running the script with an exit status other than 75 never requeues (checked by the last, finishing job).
"""

import os
import shlex
import signal
import stat
import sys

import pytest
import torch

from cribo_utils.train import EXIT_PREEMPTED
from tests.launch_helpers import (
    REPO,
    child_env,
    output_of,
    start,
    step_records,
    training_command,
    wait_for_exit,
    wait_for_steps,
)
from tests.test_train import TINY

# 3 epochs of 4 iterations; one data-loading worker, so signals also reach a worker process; no epoch copies.
FLAGS = ("--epochs", "3", "--num_workers", "1", "--saveckp_freq", "100")
TOTAL_ITERATIONS = 12


def _checkpoint_iteration(output_dir):
    return torch.load(output_dir / "checkpoint.pth", weights_only=True)["iteration"]


def _preempt(process, output_dir, after_iteration, send):
    """Wait for progress past ``after_iteration``, send the signal, return the checkpoint's iteration."""
    wait_for_steps(process, output_dir, after_iteration)
    send()
    assert wait_for_exit(process, timeout=120) == EXIT_PREEMPTED
    iteration = _checkpoint_iteration(output_dir)
    # the checkpoint is at the boundary right after the last completed (logged) iteration
    assert iteration == step_records(output_dir)[-1]["iteration"]
    assert after_iteration < iteration < TOTAL_ITERATIONS
    assert not [name for name in os.listdir(output_dir) if ".tmp." in name]
    return iteration


def _fake_slurm_bin(tmp_path):
    """``srun`` that drops its options and execs the command; ``scontrol`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # ``python`` is a wrapper that execs this interpreter by its own path: a symlink to sys.executable would
    # start the base interpreter of a virtualenv (pyvenv.cfg is looked up next to the link, not the target).
    scripts = {
        "srun": '#!/bin/bash\nwhile [ $# -gt 0 ] && [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
        "scontrol": '#!/bin/bash\necho "$*" >> "$FAKE_SCONTROL_LOG"\n',
        "python": f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.mark.slow
def test_preempted_three_times_then_finished_without_losing_an_iteration(tmp_path):
    """Four processes on one output folder: two plain runs stopped by SIGUSR1 / SIGTERM, then run_slurm.sh
    stopped by SIGUSR1 (requeued) and its requeued job, which finishes."""
    output_dir = tmp_path / "run"
    command = training_command(output_dir, *FLAGS)

    # SIGUSR1 to the whole process group (main process and data-loading worker), as SLURM does.
    first = start(command, tmp_path / "first", new_session=True)
    stopped_1 = _preempt(first, output_dir, 0, lambda: os.killpg(first.pid, signal.SIGUSR1))
    out, err = output_of(tmp_path / "first")
    assert f"preemption signal SIGUSR1: checkpoint written at iteration {stopped_1}" in out, out[-2000:] + err

    # The same command resumes from that iteration; SIGTERM to the main process only.
    second = start(command, tmp_path / "second")
    stopped_2 = _preempt(second, output_dir, stopped_1, lambda: second.send_signal(signal.SIGTERM))
    out, _ = output_of(tmp_path / "second")
    assert f"at iteration {stopped_1}" in out and "preemption signal SIGTERM" in out

    # run_slurm.sh under a fake srun: `scancel --batch --signal=USR1` reaches the batch script, which forwards
    # it to the task; the task checkpoints and exits with 75, and the script requeues the job.
    bin_dir = _fake_slurm_bin(tmp_path)
    scontrol_log = tmp_path / "scontrol.log"
    env = child_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_CPUS_PER_TASK="1",
        OUTPUT_DIR=str(output_dir),
        FAKE_SCONTROL_LOG=str(scontrol_log),
    )
    job_command = ["bash", str(REPO / "run_slurm.sh"), *TINY, *FLAGS]
    job = start(job_command, tmp_path / "job", env=env)
    stopped_3 = _preempt(job, output_dir, stopped_2, lambda: job.send_signal(signal.SIGUSR1))
    out, _ = output_of(tmp_path / "job")
    assert f"at iteration {stopped_2}" in out and "caught SIGUSR1, forwarding to the tasks" in out
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]

    # the requeued job runs the same script: it resumes, finishes with 0 and does not requeue again
    requeued = start(job_command, tmp_path / "requeued", env=env)
    assert wait_for_exit(requeued, timeout=180) == 0, output_of(tmp_path / "requeued")[1][-3000:]
    assert f"at iteration {stopped_3}" in output_of(tmp_path / "requeued")[0]
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]
    assert _checkpoint_iteration(output_dir) == TOTAL_ITERATIONS
    # across the four processes every iteration ran exactly once: nothing lost, nothing repeated
    iterations = [record["iteration"] for record in step_records(output_dir)]
    assert iterations == list(range(1, TOTAL_ITERATIONS + 1))


def test_preempted_names_the_signal_and_the_iteration_to_resume_from():
    import signal

    import torch

    from cribo_utils.train.preemption import Preempted, stop_requested

    stop = Preempted(7, [signal.SIGUSR1, signal.SIGTERM])
    assert stop.iteration == 7 and stop.signal_name == "SIGUSR1" and "after iteration 7" in str(stop)
    assert Preempted(3, []).signal_name == "(on another rank)"  # another rank's signal stopped this one
    assert stop_requested([signal.SIGTERM], 1, torch.device("cpu"))
    assert not stop_requested([], 1, torch.device("cpu"))
