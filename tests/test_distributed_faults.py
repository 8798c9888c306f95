"""A lost process never hangs the others: two real training ranks, one killed or frozen from outside.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), but
without torchrun's agent, which would tear the group down itself when a worker dies: here the survivor has
to notice on its own, through a failed collective or the ``--dist_timeout`` bound, and name the lost rank.
"""

import json
import os
import signal
import time

import pytest

from tests.ddp_helpers import find_free_port
from tests.launch_helpers import child_env, output_of, start, training_command, wait_for_exit, wait_for_steps

DIST_TIMEOUT = 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "victim, fault",
    [
        (1, signal.SIGKILL),  # a crashed process: its sockets close, the next collective fails at once
        (1, signal.SIGSTOP),  # a frozen process (dead node, stuck I/O): only the timeout can end the wait
        (0, signal.SIGKILL),  # rank 0 also hosts the rendezvous store
    ],
)
def test_a_lost_rank_ends_the_other_with_a_message_in_bounded_time(tmp_path, victim, fault):
    output_dir = tmp_path / "run"
    port = str(find_free_port())
    # --batch_size 4 over 2 processes: 2 images per process (the global flag); 200 iterations: never finishes
    command = training_command(
        output_dir,
        "--batch_size",
        "4",
        "--epochs",
        "50",
        "--saveckp_freq",
        "100",
        "--dist_timeout",
        str(DIST_TIMEOUT),
    )
    ranks = [
        start(
            command,
            tmp_path / f"rank{rank}",
            env=child_env(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for rank in (0, 1)
    ]
    survivor = 1 - victim
    try:
        wait_for_steps(ranks[0], output_dir, 1)
        assert json.loads((output_dir / "args.json").read_text())["batch_size_per_gpu"] == 2
        start_time = time.monotonic()
        os.kill(ranks[victim].pid, fault)
        status = wait_for_exit(ranks[survivor], timeout=20 * DIST_TIMEOUT)
        elapsed = time.monotonic() - start_time
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()  # SIGKILL also ends a stopped process
                process.wait()
    _, err = output_of(tmp_path / f"rank{survivor}")
    assert status == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"main_cribo.py: error: rank {survivor}: a collective operation failed or timed "
        f"out (--dist_timeout {DIST_TIMEOUT} s): "
    )
    if victim == 1:
        assert f"rank 1 did not respond within {DIST_TIMEOUT} s: it died or hangs" in line
    else:
        assert "rank 0 (which hosts the rendezvous store) cannot be reached" in line
    if fault == signal.SIGSTOP:
        assert elapsed >= DIST_TIMEOUT  # nothing but the timeout could end the wait
    assert elapsed < 8 * DIST_TIMEOUT  # collective timeout + roll call + exit, with room for a loaded machine
    log = (output_dir / "logs" / f"rank{survivor}.log").read_text()
    assert "a collective operation failed" in log  # the per-rank log says why the process stopped
