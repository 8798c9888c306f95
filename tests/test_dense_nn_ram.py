"""The dense-NN RAM estimate against real allocations, and the named protocols' statements built from it.

Each case builds a memory the way the evaluation does (extraction buffer in the storage dtype, the labels
joined from per-batch parts, the local index, one full-size search) in a fresh process and compares the
growth of its peak resident memory with the analytical estimate of the same parts
(:func:`cribo_utils.eval.dense_nn.plan.estimate_memory_bytes`): the estimate must never be below what the run
needs, nor far above it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cribo_utils.eval.dense_nn.plan import estimate_memory_bytes
from cribo_utils.eval.dense_nn.protocols import PROTOCOLS, protocol_ram, protocol_statement

REPO = Path(__file__).resolve().parents[1]

_PROBE = r"""
import json, sys
import torch
import torch.nn.functional as F
from cribo_utils.eval.dense_nn import DenseNNConfig, MemoryPlan, assemble_memory
from cribo_utils.eval.dense_nn.config import MEMORY_DTYPES
from cribo_utils.eval.dense_nn.labels import PatchLabels
from cribo_utils.eval.dense_nn.search import MemoryShard, _import_faiss

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

size, dim, dtype, index, num_queries = sys.argv[1:]
size, dim, num_queries = int(size), int(dim), int(num_queries)
torch.set_num_threads(1)
if index != "torch":
    _import_faiss()
cfg = DenseNNConfig(index=index, memory_dtype=dtype, progress=False)
queries = F.normalize(torch.randn(num_queries, dim), dim=1)
counts = torch.zeros(4096, 21, dtype=torch.long)
counts[:, 0] = 256
warm_up = MemoryShard(F.normalize(torch.randn(4096, dim), dim=1).to(MEMORY_DTYPES[dtype]),
                      PatchLabels.from_counts(counts, 256))
assemble_memory(warm_up, MemoryPlan(64, 1, 64, 64), cfg, torch.device("cpu")).index.search(queries, 30)
del warm_up
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
features = torch.empty(size, dim, dtype=MEMORY_DTYPES[dtype])  # the extraction buffer
parts = []
for start in range(0, size, 4096):  # batches: features, and labels of 8 classes x 32 pixels per patch
    rows = min(4096, size - start)
    features[start:start + rows] = F.normalize(torch.randn(rows, dim), dim=1)
    counts = torch.zeros(rows, 21, dtype=torch.long)
    counts.scatter_(1, torch.rand(rows, 21).argsort(dim=1)[:, :8], 32)
    parts.append(PatchLabels.from_counts(counts, 256))
labels = PatchLabels.concatenate(parts, 21, 256)
del parts
memory = assemble_memory(MemoryShard(features, labels), MemoryPlan(size // 64, 1, 64, 64), cfg,
                         torch.device("cpu"))
del features, labels
memory.index.search(queries, 30)
print(json.dumps({"grown": status("VmHWM") - base}))
"""


def _measured_and_estimated(size: int, dim: int, dtype: str, index: str) -> tuple[int, int]:
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, str(size), str(dim), dtype, index, "1024"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    grown = json.loads(completed.stdout.strip().splitlines()[-1])["grown"]
    estimate = estimate_memory_bytes(size, dim, 21, 16, index, memory_dtype=dtype, queries_per_search=1024)
    return grown, estimate["features"] + estimate["index"] + estimate["labels"] + estimate["search"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_ram_estimate_bounds_a_real_memory_build_and_search(dtype: str) -> None:
    grown, estimated = _measured_and_estimated(120_000, 256, dtype, "torch")
    assert 0.75 * estimated <= grown <= estimated, (grown, estimated)


@pytest.mark.slow
def test_ram_estimate_bounds_a_faiss_exact_index() -> None:
    grown, estimated = _measured_and_estimated(120_000, 256, "fp32", "exact")
    assert 0.7 * estimated <= grown <= estimated, (grown, estimated)


def test_fp16_storage_halves_the_features_and_the_protocols_state_their_estimate() -> None:
    fp32 = estimate_memory_bytes(10_240_000, 384, 21, 16, "torch", memory_dtype="fp32")
    fp16 = estimate_memory_bytes(10_240_000, 384, 21, 16, "torch", memory_dtype="fp16")
    assert fp32["features"] == 10_240_000 * 384 * 4 == 2 * fp16["features"]
    voc = PROTOCOLS["voc"]
    statement = protocol_statement(voc)
    assert f"{protocol_ram(voc, 384)['process'] / 2**30:.1f} GiB with ViT-S/16" in statement
    assert f"{protocol_ram(voc, 768)['process'] / 2**30:.1f} GiB with ViT-B/16" in statement
    assert "M = 10,240,000" in statement and "k = 30" in statement and "512 px" in statement
    # The whole estimate of the VOC protocol with ViT-S/16: 10.24 M x 384 fp32 features dominate.
    assert 15.0 * 2**30 < protocol_ram(voc, 384)["process"] < 25 * 2**30


def test_the_readme_and_the_protocol_notes_state_the_estimate_the_code_gives() -> None:
    voc = PROTOCOLS["voc"]
    gib = {dim: protocol_ram(voc, dim)["process"] / 2**30 for dim in (384, 768)}
    gpu = {dim: protocol_ram(voc, dim, index_on_gpu=True)["gpu"] / 2**30 for dim in (384, 768)}
    readme = (REPO / "README.md").read_text()
    for name in ("voc", "ade20k"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` ("))
        assert f"| {gib[384]:.1f} / {gib[768]:.1f} GiB | {gpu[384]:.1f} / {gpu[768]:.1f} GiB |" in row, row
    notes = " ".join((REPO / "docs" / "dense-nn-protocol.md").read_text().split())
    assert f"it gives {gib[384]:.1f} GiB with ViT-S/16 and {gib[768]:.1f} GiB with ViT-B/16" in notes
    assert f"holds {gpu[384]:.1f} / {gpu[768]:.1f} GiB of GPU memory" in notes
