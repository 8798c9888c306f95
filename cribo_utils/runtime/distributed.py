"""Process-group set-up and collectives that do nothing in a world of one.

Three launch paths are recognised, in this order:

1. ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. ``srun`` (SLURM): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master address is the
   first host of the step's (or job's) node list, parsed here without calling ``scontrol`` for the
   usual forms (``node[01-04,07]``, ``a,b``, ``rack[1-2]-gpu[1-4]``); the port is ``MASTER_PORT`` or is
   derived from ``SLURM_JOB_ID`` so that every task of a job picks the same one.
3. Otherwise a world of one: no process group is created and every helper below is a no-op.

A partly set environment (for example ``RANK`` without ``WORLD_SIZE``) is an error rather than a silent
fall-back to one process, because a silent fall-back trains W independent models.

``--dist_url`` (DINO's flag) chooses the rendezvous: ``env://`` (the default) uses the address and port
found above; ``tcp://HOST:PORT`` replaces them (:func:`apply_dist_url`).

The collectives never carry gradients; they are used for the memory bank, the loss centres and metrics.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

import torch
import torch.distributed as dist

from cribo_utils.runtime.flags import parse_dist_url

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TORCHRUN_MARKERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
# Only set inside a task started by srun/sbatch; SLURM_NTASKS alone is also set in an `salloc` shell,
# where running a plain `python ...` must stay a world of one.
_SLURM_MARKERS = ("SLURM_PROCID", "SLURM_LOCALID")
# Ports derived from the job id fall in [_PORT_BASE, _PORT_BASE + _PORT_RANGE), below the Linux ephemeral
# range (32768+), so an outgoing connection of another process cannot already hold the port.
_PORT_BASE = 20000
_PORT_RANGE = 10000
RENDEZVOUS_TIMEOUT_S = 600  # at least this long for all ranks to join, whatever the collective timeout
# The rendezvous store of the process group (rank 0 hosts it), kept to diagnose failed collectives.
_STORE: dist.Store | None = None


@dataclass(frozen=True)
class DistEnv:
    """What this process is in the distributed run.

    Attributes:
        rank: global rank in [0, world_size).
        local_rank: rank within the node; selects the GPU.
        world_size: number of processes W.
        device: device this process computes on (``cuda:<local_rank>`` with NCCL, else ``cpu``).
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for a world of one without a process group.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None


@dataclass(frozen=True)
class LaunchConfig:
    """Launch parameters read from the environment, before any process group exists.

    Attributes:
        launcher: ``"torchrun"``, ``"slurm"`` or ``"single"``.
        rank: global rank.
        local_rank: rank within the node.
        world_size: number of processes.
        master_addr: rendezvous host (``None`` for ``"single"``).
        master_port: rendezvous port (``None`` for ``"single"``).
    """

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None = None
    master_port: int | None = None


# --------------------------------------------------------------------------------------------------
# Environment parsing (pure functions, tested with mocked environments)
# --------------------------------------------------------------------------------------------------


def _parse_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from None


def _check_ranks(launcher: str, rank: int, local_rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"{launcher}: world size {world_size} must be >= 1.")
    if not 0 <= rank < world_size:
        raise ValueError(f"{launcher}: rank {rank} is outside [0, world size {world_size}).")
    if local_rank < 0:
        raise ValueError(f"{launcher}: local rank {local_rank} must be >= 0.")


def _expand_bracket(content: str, nodelist: str) -> list[str]:
    """Expand the inside of one ``[...]`` group, e.g. ``"01-03,07"`` -> ``["01", "02", "03", "07"]``."""
    values: list[str] = []
    for part in content.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"Cannot parse range {part!r} in node list {nodelist!r}.")
        start, stop = match.group(1), match.group(2)
        if stop is None:
            values.append(start)
            continue
        if int(stop) < int(start):
            raise ValueError(f"Decreasing range {part!r} in node list {nodelist!r}.")
        # Slurm pads every value of a range to the width of its first bound: node[08-10] -> node08..node10.
        width = len(start)
        values.extend(str(i).zfill(width) for i in range(int(start), int(stop) + 1))
    return values


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas that are outside brackets: ``"a[1,2],b"`` -> ``["a[1,2]", "b"]``."""
    items, depth, current = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"Nested brackets in node list {nodelist!r}.")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Unbalanced ']' in node list {nodelist!r}.")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"Unbalanced '[' in node list {nodelist!r}.")
    items.append("".join(current))
    if any(not item for item in items):
        raise ValueError(f"Empty host name in node list {nodelist!r}.")
    return items


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list without calling ``scontrol``.

    Supports comma-separated items, each made of literal text and any number of bracket groups of
    comma-separated integers or integer ranges, with zero padding kept:
    ``"node[01-03,07],gpu[1-2]-ib"`` -> ``node01 node02 node03 node07 gpu1-ib gpu2-ib``. Several groups in
    one item give their Cartesian product, the last group varying fastest (as ``scontrol`` does).

    Args:
        nodelist: the value of ``SLURM_JOB_NODELIST`` / ``SLURM_STEP_NODELIST``.

    Returns:
        Host names in Slurm order.

    Raises:
        ValueError: when the string is not of the supported form.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("Empty Slurm node list.")
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        pieces: list[list[str]] = []
        position = 0
        for match in re.finditer(r"\[([^\[\]]*)\]", item):
            if match.start() > position:
                pieces.append([item[position : match.start()]])
            pieces.append(_expand_bracket(match.group(1), nodelist))
            position = match.end()
        if position < len(item):
            pieces.append([item[position:]])
        hosts.extend("".join(parts) for parts in product(*pieces))
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: parsed locally, ``scontrol show hostnames`` only as a fall-back.

    Args:
        nodelist: e.g. ``"node[01-04,07]"`` or ``"a,b"``.

    Returns:
        The first host name, e.g. ``"node01"``.

    Raises:
        ValueError: when the list cannot be parsed and ``scontrol`` is unavailable or fails.
    """
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError as parse_error:
        try:
            completed = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError) as scontrol_error:
            raise ValueError(
                f"Cannot find the master host in SLURM node list {nodelist!r} ({parse_error}) and "
                f"`scontrol show hostnames` failed ({scontrol_error}). Set MASTER_ADDR to the host of rank 0."
            ) from scontrol_error
        hosts = completed.stdout.split()
        if not hosts:
            raise ValueError(f"`scontrol show hostnames {nodelist}` returned no host.") from parse_error
        return hosts[0]


def slurm_port(job_id: str) -> int:
    """Rendezvous port shared by all tasks of a job: ``20000 + (job id mod 10000)``.

    Args:
        job_id: ``SLURM_JOB_ID`` (digits; anything else, e.g. an array suffix, is ignored).

    Returns:
        A port in [20000, 30000).
    """
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} has no digits; set MASTER_PORT explicitly.")
    return _PORT_BASE + int(digits) % _PORT_RANGE


def _missing(environ: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name not in environ]


def detect_launch_environment(environ: Mapping[str, str] | None = None) -> LaunchConfig:
    """Read how this process was launched: torchrun first, then SLURM, else a world of one.

    Args:
        environ: the environment to read (defaults to ``os.environ``; tests pass a dict).

    Returns:
        The launch parameters.

    Raises:
        ValueError: for a partly set torchrun or SLURM environment, non-integer values or a rank outside
            the world.
    """
    environ = os.environ if environ is None else environ

    if any(name in environ for name in _TORCHRUN_MARKERS):
        missing = _missing(environ, TORCHRUN_VARIABLES)
        if missing:
            raise ValueError(
                f"Partial torchrun environment: {', '.join(missing)} missing (torchrun sets all of "
                f"{', '.join(TORCHRUN_VARIABLES)}). Launch with `torchrun`, or unset "
                f"{', '.join(n for n in TORCHRUN_VARIABLES if n in environ)} to run as one process."
            )
        rank = _parse_int(environ, "RANK")
        world_size = _parse_int(environ, "WORLD_SIZE")
        local_rank = _parse_int(environ, "LOCAL_RANK")
        _check_ranks("torchrun", rank, local_rank, world_size)
        return LaunchConfig(
            "torchrun",
            rank,
            local_rank,
            world_size,
            environ["MASTER_ADDR"],
            _parse_int(environ, "MASTER_PORT"),
        )

    if any(name in environ for name in _SLURM_MARKERS):
        missing = _missing(environ, SLURM_VARIABLES)
        nodelist = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST"))
        if nodelist is None and "MASTER_ADDR" not in environ:
            missing.append("SLURM_JOB_NODELIST")
        if "MASTER_PORT" not in environ and "SLURM_JOB_ID" not in environ:
            missing.append("SLURM_JOB_ID (or MASTER_PORT)")
        if missing:
            raise ValueError(
                f"Partial SLURM environment: {', '.join(missing)} missing. Launch the script with `srun` "
                "(see run_slurm.sh), or use torchrun."
            )
        rank = _parse_int(environ, "SLURM_PROCID")
        world_size = _parse_int(environ, "SLURM_NTASKS")
        local_rank = _parse_int(environ, "SLURM_LOCALID")
        _check_ranks("SLURM", rank, local_rank, world_size)
        # The step's node list is the right one when a step uses a subset of the job's nodes: rank 0 runs
        # on the first node of the step. A hand-set MASTER_ADDR wins (e.g. a host name for another NIC).
        master_addr = environ["MASTER_ADDR"] if "MASTER_ADDR" in environ else first_host(str(nodelist))
        if "MASTER_PORT" in environ:
            master_port = _parse_int(environ, "MASTER_PORT")
        else:
            master_port = slurm_port(environ["SLURM_JOB_ID"])
        return LaunchConfig("slurm", rank, local_rank, world_size, master_addr, master_port)

    return LaunchConfig("single", 0, 0, 1)


def apply_dist_url(launch: LaunchConfig, dist_url: str) -> LaunchConfig:
    """The launch with the rendezvous of ``--dist_url``: ``env://`` keeps it, ``tcp://HOST:PORT`` sets it.

    Raises:
        ValueError: for any other URL (one line naming the flag and the accepted forms).
    """
    rendezvous = parse_dist_url(dist_url)
    if rendezvous is None or launch.world_size == 1:
        return launch
    host, port = rendezvous
    return LaunchConfig(launch.launcher, launch.rank, launch.local_rank, launch.world_size, host, port)


# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------


def _env_from_initialised_group() -> DistEnv:
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def init_distributed(
    timeout_s: float = 1800, backend: str | None = None, dist_url: str = "env://"
) -> DistEnv:
    """Create the process group described by the environment (or none for a world of one).

    NCCL with one GPU per process (``cuda:<local_rank>`` becomes the current device) when CUDA is
    available, gloo on CPU. Calling it again after a successful initialisation returns the same answer.

    Args:
        timeout_s: bound, in seconds, on every collective (``--dist_timeout``), so a missing rank fails
            with an error instead of hanging forever; the rendezvous waits ``max(timeout_s,
            RENDEZVOUS_TIMEOUT_S)`` for all ranks to join.
        backend: ``None`` picks NCCL if CUDA is available, else gloo; ``"gloo"`` forces CPU (tests,
            debugging); ``"nccl"`` requires CUDA.
        dist_url: ``--dist_url``: ``env://`` or ``tcp://HOST:PORT`` (:func:`apply_dist_url`).

    Returns:
        The rank, local rank, world size, device and backend of this process.

    Raises:
        ValueError: for a partly set launch environment, an unknown backend or a malformed ``dist_url``.
        RuntimeError: when NCCL is requested without CUDA, or the rendezvous fails.
    """
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"init_distributed: backend {backend!r} is not one of None, 'nccl', 'gloo'.")
    if dist.is_available() and dist.is_initialized():
        return _env_from_initialised_group()

    launch = apply_dist_url(detect_launch_environment(), dist_url)
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("init_distributed: backend 'nccl' requested but CUDA is not available.")
    device = torch.device("cuda", launch.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"init_distributed: local rank {launch.local_rank} but only {torch.cuda.device_count()} "
                "visible GPU(s); start one process per GPU (torchrun --nproc_per_node, srun --gpus-per-task)."
            )
        torch.cuda.set_device(device)

    if launch.world_size == 1:
        logger.info(
            "Running as a single process (%s launch) on %s; no process group.", launch.launcher, device
        )
        return DistEnv(0, launch.local_rank, 1, device, None)

    chosen = "nccl" if use_cuda else "gloo"
    init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
    logger.info(
        "Initialising %s process group via %s (%s launch): rank %d/%d, local rank %d, timeout %ss.",
        chosen,
        init_method,
        launch.launcher,
        launch.rank,
        launch.world_size,
        launch.local_rank,
        timeout_s,
    )
    global _STORE
    assert launch.master_addr is not None and launch.master_port is not None
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        # An explicit store (what init_method="tcp://..." would create) so that the ranks can still talk
        # through it after a collective fails: see :func:`find_lost_ranks`.
        # The rendezvous may wait longer than a collective: ranks can start minutes apart on a busy cluster.
        store = dist.TCPStore(
            launch.master_addr,
            launch.master_port,
            launch.world_size,
            is_master=launch.rank == 0,
            timeout=max(timeout, datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)),
        )
        dist.init_process_group(
            backend=chosen, store=store, world_size=launch.world_size, rank=launch.rank, timeout=timeout
        )
        store.set_timeout(timeout)
    except dist.DistError as error:
        raise RuntimeError(
            f"Rendezvous at {init_method} failed for rank {launch.rank}/{launch.world_size} ({error}). "
            "Check that all ranks were started (a `python` call inside an sbatch script with --ntasks > 1 "
            "but without `srun` starts only one), and that the port is free."
        ) from error
    _STORE = store
    return DistEnv(launch.rank, launch.local_rank, launch.world_size, device, chosen)


def cleanup() -> None:
    """Destroy the process group if there is one."""
    global _STORE
    if is_dist():
        dist.destroy_process_group()
    _STORE = None


# --------------------------------------------------------------------------------------------------
# Lost ranks: a collective that fails because a peer died or hangs
# --------------------------------------------------------------------------------------------------

_ROLL_CALL_KEY = "cribo/alive_after_failure/{rank}"
# Messages of the errors gloo / NCCL / c10d raise (as plain RuntimeError) when a peer is gone or late.
_COLLECTIVE_FAILURE = re.compile(
    r"Connection (closed|reset) by peer|Timed out waiting|timed out|Broken pipe|gloo|NCCL|ProcessGroup|"
    r"monitoredBarrier|Socket Timeout|Connection refused",
    re.IGNORECASE,
)


class CollectiveFailure(RuntimeError):
    """A collective operation failed because another rank died or stopped responding.

    Attributes:
        rank: this process's rank.
        lost_ranks: ranks that did not check in after the failure (``None``: the store on rank 0 was
            unreachable, so rank 0 itself is presumably gone).
    """

    def __init__(self, message: str, rank: int, lost_ranks: list[int] | None) -> None:
        super().__init__(message)
        self.rank = rank
        self.lost_ranks = lost_ranks


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` looks like a failed or timed-out collective (gloo and NCCL raise RuntimeError)."""
    return isinstance(error, dist.DistError) or bool(_COLLECTIVE_FAILURE.search(str(error)))


def find_lost_ranks(wait_s: float) -> list[int] | None:
    """After a failed collective, the ranks that are gone: a roll call through the rendezvous store.

    Every surviving rank that calls this writes ``alive/<rank>`` to the store (hosted by rank 0), then
    waits up to ``wait_s`` seconds for all ``W`` keys. A dead or hung rank never writes its key.

    Args:
        wait_s: how long to wait for the other survivors to notice the failure and check in.

    Returns:
        Sorted ranks that did not check in; ``None`` when the store cannot be reached (rank 0 is gone) or
        there is no process group.
    """
    if _STORE is None or not is_dist():
        return None
    world_size = get_world_size()
    keys = [_ROLL_CALL_KEY.format(rank=r) for r in range(world_size)]
    deadline = time.monotonic() + wait_s
    try:
        _STORE.set(keys[get_rank()], "1")
        while True:
            missing = [r for r, key in enumerate(keys) if not _STORE.check([key])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.1)
    except (dist.DistError, RuntimeError) as error:
        logger.warning("the rendezvous store on rank 0 cannot be reached (%s)", error)
        return None


def diagnose_collective_failure(error: BaseException, wait_s: float, timeout_s: float) -> CollectiveFailure:
    """Turn a failed collective into a one-line :class:`CollectiveFailure` naming the lost rank(s).

    Args:
        error: what the collective raised.
        wait_s: roll-call window (:func:`find_lost_ranks`).
        timeout_s: the collective timeout in force (``--dist_timeout``), quoted in the message.

    Returns:
        The exception to raise (with ``lost_ranks`` set).
    """
    rank = get_rank()
    lost = find_lost_ranks(wait_s)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first_line = first_line.split(". This is typically")[0]  # gloo's generic advice follows
    if lost is None:
        who = "rank 0 (which hosts the rendezvous store) cannot be reached: it died or its node is down"
    elif lost:
        names = ", ".join(str(r) for r in lost)
        who = (
            f"rank{'s' if len(lost) > 1 else ''} {names} did not respond within {wait_s:g} s: "
            f"{'they' if len(lost) > 1 else 'it'} died or hang{'' if len(lost) > 1 else 's'}"
        )
    else:
        who = "every rank is still alive, so the failure is in the communication itself"
    message = (
        f"rank {rank}: a collective operation failed or timed out (--dist_timeout {timeout_s:g} s): "
        f"{who} [{first_line[:300]}]. Check that process's log, then rerun: the run resumes from the "
        "last checkpoint"
    )
    return CollectiveFailure(message, rank, lost)


# --------------------------------------------------------------------------------------------------
# Queries and collectives (no-ops in a world of one)
# --------------------------------------------------------------------------------------------------


def is_dist() -> bool:
    """True when a process group exists (even of size one)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """World size W, 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """True on rank 0 (the only rank that writes checkpoints and logs)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; no-op for W == 1."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place: ``t <- sum_r t_r``; no-op for W == 1.

    Args:
        tensor: any shape, identical on every rank.

    Returns:
        The same tensor object, now holding the sum.
    """
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, in place: ``t <- max_r t_r``; no-op for W == 1."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` to every rank, in place; no-op for W == 1.

    Args:
        tensor: any shape, identical shape and dtype on every rank.
        src: the rank whose values win.

    Returns:
        The same tensor object.
    """
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_fixed(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order.

    Args:
        tensor: (L, ...) with the same shape on every rank.

    Returns:
        (W*L, ...) = ``cat([t_0, ..., t_{W-1}])``; the input itself for W == 1. No gradient flows.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def all_gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks, in rank order.

    ``cat([t_0, ..., t_{W-1}], dim=0)`` with ``t_r`` of shape (L_r, ...): the lengths are gathered first,
    every rank pads its tensor with zeros to ``max_r L_r``, the padded tensors are gathered and each is
    trimmed back to its own length. Zero-length inputs are allowed.

    Args:
        tensor: (L_r, ...) with the trailing shape and dtype identical on every rank.

    Returns:
        (sum_r L_r, ...); the input itself for W == 1. No gradient flows.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    length = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    lengths = all_gather_fixed(length).tolist()
    max_length = max(lengths)
    padded = tensor.new_zeros((max_length, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_fixed(padded)
    pieces = [gathered[r * max_length : r * max_length + lengths[r]] for r in range(world_size)]
    return torch.cat(pieces, dim=0)
