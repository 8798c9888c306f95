"""Tests for cribo_utils/runtime/distributed.py: launch-environment parsing (mocked) and real 2-rank
collectives."""

from __future__ import annotations

import subprocess

import pytest
import torch
from ddp_helpers import run_distributed

from cribo_utils.runtime import distributed
from cribo_utils.runtime.distributed import (
    DistEnv,
    LaunchConfig,
    detect_launch_environment,
    expand_nodelist,
    first_host,
    slurm_port,
)

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29500",
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08,11]",
    "SLURM_JOB_ID": "123456",
}

# --------------------------------------------------------------------------------------------------
# Environment parsing
# --------------------------------------------------------------------------------------------------


def test_torchrun_environment() -> None:
    assert detect_launch_environment(TORCHRUN) == LaunchConfig("torchrun", 3, 1, 8, "10.0.0.5", 29500)


def test_torchrun_wins_over_slurm() -> None:
    """torchrun inside an srun allocation: the torchrun variables describe the processes."""
    assert detect_launch_environment({**SLURM, **TORCHRUN}).launcher == "torchrun"


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_partial_torchrun_environment_is_an_error(missing: str) -> None:
    environ = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(ValueError, match=f"Partial torchrun environment: {missing}"):
        detect_launch_environment(environ)


def test_master_variables_alone_do_not_make_a_torchrun_launch() -> None:
    assert detect_launch_environment({"MASTER_ADDR": "x", "MASTER_PORT": "1"}).launcher == "single"


def test_slurm_environment_with_ranged_nodelist() -> None:
    assert detect_launch_environment(SLURM) == LaunchConfig("slurm", 5, 1, 8, "gpu07", 20000 + 123456 % 10000)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node[01-04,07]", "node01"), ("a,b", "a"), ("single-host", "single-host"), ("x[3-4]-ib,y", "x3-ib")],
)
def test_slurm_master_is_the_first_host(nodelist: str, host: str) -> None:
    assert detect_launch_environment({**SLURM, "SLURM_JOB_NODELIST": nodelist}).master_addr == host


def test_slurm_step_nodelist_master_port_and_master_addr_overrides() -> None:
    environ = {**SLURM, "SLURM_STEP_NODELIST": "gpu11", "MASTER_PORT": "12345"}
    assert detect_launch_environment(environ) == LaunchConfig("slurm", 5, 1, 8, "gpu11", 12345)
    assert detect_launch_environment({**SLURM, "MASTER_ADDR": "ib-gpu07"}).master_addr == "ib-gpu07"


@pytest.mark.parametrize(
    "missing", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"]
)
def test_partial_slurm_environment_is_an_error(missing: str) -> None:
    environ = {k: v for k, v in SLURM.items() if k != missing}
    with pytest.raises(ValueError, match=f"Partial SLURM environment: {missing}"):
        detect_launch_environment(environ)


def test_no_launcher_and_salloc_shell_are_a_world_of_one() -> None:
    assert detect_launch_environment({}) == LaunchConfig("single", 0, 0, 1)
    salloc_shell = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect_launch_environment(salloc_shell).launcher == "single"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"RANK": "8"}, "outside"),
        ({"RANK": "-1"}, "outside"),
        ({"WORLD_SIZE": "0"}, ">= 1"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT"),
    ],
)
def test_invalid_values(override: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detect_launch_environment({**TORCHRUN, **override})


def test_expand_nodelist_forms() -> None:
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_nodelist("a,b") == ["a", "b"]
    assert expand_nodelist("gpu[8-10],cpu[001-002]-ib") == ["gpu8", "gpu9", "gpu10", "cpu001-ib", "cpu002-ib"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    for bad in ("", "a[1-", "a]", "a[b]", "a,,b", "a[[1]]", "a[3-1]"):
        with pytest.raises(ValueError):
            expand_nodelist(bad)


def test_first_host_falls_back_to_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="weird-host1\nweird-host2\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert first_host("node[01-02]") == "node01" and calls == []  # parsed locally, no scontrol
    assert first_host("weird[a-b]") == "weird-host1"
    assert calls == [["scontrol", "show", "hostnames", "weird[a-b]"]]

    def missing_scontrol(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(subprocess, "run", missing_scontrol)
    with pytest.raises(ValueError, match="Set MASTER_ADDR"):
        first_host("weird[a-b]")


def test_slurm_port_is_stable_and_in_range() -> None:
    assert slurm_port("123456") == slurm_port("123456") == 23456
    assert 20000 <= slurm_port("99999999") < 30000
    with pytest.raises(ValueError, match="MASTER_PORT"):
        slurm_port("abc")


# --------------------------------------------------------------------------------------------------
# World of one
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name in distributed.TORCHRUN_VARIABLES or name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environment")
def test_init_without_launcher_is_a_world_of_one_without_process_group() -> None:
    env = distributed.init_distributed(timeout_s=5, backend="gloo")
    assert env == DistEnv(0, 0, 1, torch.device("cpu"), None)
    assert not distributed.is_dist()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()


def test_init_with_partial_environment_raises(
    clean_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="Partial torchrun"):
        distributed.init_distributed()
    with pytest.raises(ValueError, match="backend"):
        distributed.init_distributed(backend="mpi")


def test_torchrun_world_of_one_creates_no_group(
    clean_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(name, value)
    assert distributed.init_distributed(backend="gloo").backend is None and not distributed.is_dist()


def test_collectives_are_identity_for_a_world_of_one() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_reduce_sum(x) is x and torch.equal(x, torch.arange(6.0).reshape(3, 2))
    assert distributed.all_gather_fixed(x) is x and distributed.all_gather_varlen(x) is x
    assert distributed.broadcast(x) is x
    distributed.barrier()
    distributed.cleanup()


# --------------------------------------------------------------------------------------------------
# Two real gloo ranks
# --------------------------------------------------------------------------------------------------

VARLEN_CASES = [(3, 0), (0, 0), (2, 5), (0, 4)]


def local_rows(rank: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(length * 6).reshape(length, 2, 3) + 1000 * rank + 1).to(dtype)


def _collectives_on_every_rank() -> dict[str, object]:
    env = distributed.init_distributed()  # already initialised by the helper: returns the same answer
    rank = distributed.get_rank()
    varlen = [
        distributed.all_gather_varlen(local_rows(rank, lengths[rank], torch.float32))
        for lengths in VARLEN_CASES
    ]
    varlen_long = distributed.all_gather_varlen(torch.arange(rank * 3, dtype=torch.long))
    summed = distributed.all_reduce_sum(torch.tensor([1.0, 2.0]) * (rank + 1))
    fixed = distributed.all_gather_fixed(torch.full((2, 2), float(rank)))
    broadcast = distributed.broadcast(torch.tensor([rank + 10]), src=1)
    distributed.barrier()
    return {
        "env": env,
        "rank": rank,
        "world": distributed.get_world_size(),
        "is_dist": distributed.is_dist(),
        "main": distributed.is_main_process(),
        "varlen": varlen,
        "varlen_long": varlen_long,
        "summed": summed,
        "fixed": fixed,
        "broadcast": broadcast,
    }


@pytest.mark.slow
def test_collectives_on_two_gloo_ranks() -> None:
    results = run_distributed(_collectives_on_every_rank, world_size=2)
    for rank, result in enumerate(results):
        assert result["env"] == DistEnv(rank, rank, 2, torch.device("cpu"), "gloo")
        assert result["rank"] == rank and result["world"] == 2 and result["is_dist"]
        assert result["main"] == (rank == 0)
        for lengths, gathered in zip(VARLEN_CASES, result["varlen"], strict=True):
            expected = torch.cat([local_rows(r, lengths[r], torch.float32) for r in range(2)])
            assert gathered.shape == (sum(lengths), 2, 3) and torch.equal(gathered, expected)
        assert torch.equal(result["varlen_long"], torch.tensor([0, 1, 2]))
        assert torch.equal(result["summed"], torch.tensor([3.0, 6.0]))
        assert torch.equal(result["fixed"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert torch.equal(result["broadcast"], torch.tensor([11]))
