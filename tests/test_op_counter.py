"""The operator counter of the train-step benchmark: what it counts, per section, and which operators it
flags as host synchronisations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.op_counter import OUTSIDE, CountingTimer, OpCounter


def test_counts_leaf_operators_per_section_with_backward() -> None:
    weight = torch.randn(4, 3, requires_grad=True)
    inputs = torch.randn(2, 3)
    counter = OpCounter()
    with counter:
        with counter.section("forward"):
            loss = F.linear(inputs, weight).sum()  # t (a view), mm, sum
        with counter.section("backward"):
            loss.backward()
        torch.ones(3).add_(1.0)  # outside every section: ones, add_
    assert dict(counter.ops["forward"]) == {"aten.t": 1, "aten.mm": 1, "aten.sum": 1}
    assert dict(counter.kernels["forward"]) == {"aten.mm": 1, "aten.sum": 1}  # t only changes metadata
    assert sum(counter.ops["backward"].values()) > 0 and counter.kernels["backward"]["aten.mm"] == 1
    assert dict(counter.ops[OUTSIDE]) == {"aten.ones": 1, "aten.add_": 1}
    totals = counter.totals()
    assert totals["ops"]["forward"] == 3 and totals["kernels"]["forward"] == 2
    assert totals["syncs"] == {}


def test_flags_host_synchronisations() -> None:
    values = torch.tensor([1.0, -2.0, 3.0])
    counter = OpCounter()
    with counter, counter.section("reads"):
        float(values.sum())  # _local_scalar_dense
        values[values > 0]  # boolean indexing: a data-dependent shape
        values.nonzero()
        values[torch.tensor([0, 2])]  # integer indexing: no sync
        values.masked_fill(values > 0, 0.0)  # masking keeps the shape: no sync
    assert dict(counter.syncs["reads"]) == {
        "aten._local_scalar_dense": 1,
        "aten.index": 1,
        "aten.nonzero": 1,
    }
    assert counter.ops["reads"]["aten.index"] == 2


def test_counting_timer_names_the_section() -> None:
    counter = OpCounter()
    timer = CountingTimer(counter)
    with counter:
        with timer("clustering"):
            torch.zeros(2).add_(1.0)
        with timer("clustering"):  # a repeated section accumulates
            torch.zeros(2)
    assert counter.totals()["ops"] == {"clustering": 3}
    assert timer.times == {}  # it counts, it does not time
