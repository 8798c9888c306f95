"""Run a function in several real processes joined by a gloo process group (CPU), for tests.

Usage::

    def _body(x):                       # module level, so that it can be pickled
        rank = distributed.get_rank()
        return distributed.all_gather_fixed(x + rank)

    results = run_distributed(_body, torch.zeros(2), world_size=2)   # [result of rank 0, of rank 1]

Workers are forked from a ``forkserver`` that has already imported torch (``spawn`` where forkserver is
not available), so only the first call of a test session pays for the import: later calls start in well
under a second. A worker's environment is the forkserver's (taken when it started), not the caller's
current ``os.environ``. Each worker sets the torchrun variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free local port) and calls the real
``cribo_utils.runtime.distributed.init_distributed(backend="gloo")``, so every use of this helper also
exercises the torchrun launch path. The return values travel back through ``torch.save`` files. An exception
in any worker is re-raised in the caller with the worker's traceback; a worker that hangs is killed after
``timeout_s`` seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

_PRELOAD = ["torch", "cribo_utils.runtime.distributed"]
_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
_preload_requested = False


def _start_method() -> str:
    """``forkserver`` with torch preloaded (the preload list only matters before the server starts)."""
    global _preload_requested
    if _START_METHOD == "forkserver" and not _preload_requested:
        multiprocessing.set_forkserver_preload(_PRELOAD)
        _preload_requested = True
    return _START_METHOD


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out_dir: str,
    timeout_s: float,
) -> None:
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from cribo_utils.runtime import distributed

    distributed.init_distributed(timeout_s=timeout_s, backend="gloo")
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        distributed.barrier()
    finally:
        distributed.cleanup()


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 60.0
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks and return the per-rank results.

    Args:
        fn: a module-level (picklable) function; inside it use ``cribo_utils.runtime.distributed.get_rank()``
            to make rank-dependent inputs. Its return value must be ``torch.save``-able.
        *args: picklable arguments, identical for every rank.
        world_size: number of processes.
        timeout_s: wall-clock bound for the whole run and for each collective.

    Returns:
        ``[result of rank 0, ..., result of rank world_size - 1]``.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a worker raised (its traceback is in the message).
        TimeoutError: the workers did not finish within ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="ddp_test_") as out_dir:
        context = mp.start_processes(
            _worker,
            args=(world_size, find_free_port(), fn, args, out_dir, timeout_s),
            nprocs=world_size,
            join=False,
            start_method=_start_method(),
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                for process in context.processes:
                    process.join(5)
                raise TimeoutError(f"run_distributed: {fn.__name__} did not finish within {timeout_s} s.")
        return [
            torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
        ]
