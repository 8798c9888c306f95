"""Operators dispatched by a piece of torch code, per named section: the CPU-side proxy for kernel launches.

Counted with a ``TorchDispatchMode`` (``torch.utils._python_dispatch``) rather than the profiler, because the
mode sees exactly the ATen operators that reach a backend kernel: composite operators (``F.linear``,
``F.normalize``, ``einsum``) arrive already decomposed into the operators that run, each counted once,
autograd's backward operators are seen too (the autograd engine carries the mode into its threads), and
nothing is nested. The profiler records every level of the call tree (``aten::linear`` *and* the
``aten::addmm`` inside it), so its counts depend on which level one chooses. On a GPU every counted
operator that is not a view is at least one kernel launch, whatever its size; the counts are
deterministic for a given configuration and seed, so they are honest on a loaded machine, unlike timings.

Three numbers per section:

* ``ops``: every ATen operator dispatched;
* ``kernels``: those that are not views (``view``, ``t``, ``slice``, ``expand``, ... only change metadata,
  launch nothing), i.e. the operators that run a kernel;
* ``syncs``: operators that make the host wait for the device: reading a value (``.item()``, ``float(t)``,
  ``int(t)``, ``bool(t)``: ``aten._local_scalar_dense``), and operators whose output shape depends on the
  data (``nonzero``, ``masked_select``, indexing with a boolean mask, ``unique``). ``.tolist()`` and
  ``.numpy()`` of a CPU tensor read its memory without dispatching anything, so they are not counted on
  the CPU (on a GPU they dispatch the copy to the host, ``aten._to_copy``). On a CPU run every tensor is
  on the host, so reads of tensors that stay on the host by design (the photometric parameters) are
  counted too, though they are no device reads on a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cribo_utils.train.step import StepTimer

OUTSIDE = "outside_sections"
_SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
}


def _is_sync(func: Any, args: tuple[Any, ...]) -> bool:
    """True for an operator that reads device data back to the host (see the module docstring)."""
    name = str(func.overloadpacket)
    if name in _SYNC_OPS:
        return True
    if name in {"aten.index", "aten.index_put", "aten.index_put_"} and len(args) > 1:
        return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] or ()))
    return False


class OpCounter(TorchDispatchMode):
    """Count the ATen operators dispatched while the mode is active, by the current section.

    Use as a context manager; :meth:`section` names the section that the operators inside it are
    counted in (``outside_sections`` otherwise).

    Attributes:
        ops: ``{section: Counter({operator name: count})}`` of every operator.
        kernels: the same for the operators that are not views.
        syncs: the same for the host-synchronising operators.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = OUTSIDE
        self.ops: dict[str, Counter[str]] = {}
        self.kernels: dict[str, Counter[str]] = {}
        self.syncs: dict[str, Counter[str]] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = str(func.overloadpacket)
        self.ops.setdefault(self.current, Counter())[name] += 1
        if not func.is_view:
            self.kernels.setdefault(self.current, Counter())[name] += 1
        if _is_sync(func, args):
            self.syncs.setdefault(self.current, Counter())[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Count the operators dispatched inside the block under ``name`` (sections may repeat)."""
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def totals(self) -> dict[str, dict[str, int]]:
        """``{"ops" | "kernels" | "syncs": {section: count}}``."""
        return {
            kind: {section: sum(counter.values()) for section, counter in getattr(self, kind).items()}
            for kind in ("ops", "kernels", "syncs")
        }


class CountingTimer(StepTimer):
    """A ``StepTimer`` whose sections name the :class:`OpCounter` section instead of timing it."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__(enabled=False)
        self.counter = counter

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with self.counter.section(name):
            yield
