"""What every benchmark script shares: subprocess workers, peak memory, tables and JSON results.

Each benchmark measures one configuration per fresh Python process (``run_worker``), so that the peak
resident set size (``ru_maxrss``, a high-water mark that never goes down) belongs to that configuration
alone. A worker prints one line ``BENCH_RESULT <json>`` on stdout; everything else it prints is ignored.

Timings on the shared 2-core machine drift by tens of percent with the load of other users, so every
result records the 1-minute load average at its start and end (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULT_MARKER = "BENCH_RESULT "
GB = 1e9  # decimal gigabytes: the conservative unit for the memory targets

logger = logging.getLogger(__name__)


def ensure_repo_on_path() -> None:
    """Make ``models``, ``data`` and ``cribo_utils`` importable when a script is run by its path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def default_out(name: str) -> str:
    """``benchmarks/results/<name>.json``."""
    return str(RESULTS_DIR / f"{name}.json")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """Current resident set size of this process (``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def load_average() -> float:
    """1-minute load average of the machine (other users' work shows up here)."""
    return round(os.getloadavg()[0], 2)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def measure_calls(call: Callable[[], Any], device: Any, repeats: int) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` once for its peak extra memory, then ``repeats`` more times for its speed.

    The first call's peak extra memory is the CUDA ``max_memory_allocated`` delta on a GPU and the
    ``ru_maxrss`` delta on CPU (a high-water mark, so only growth beyond the earlier peak shows). ``call``
    must synchronise the device itself.

    Returns:
        The first call's result, and the fields ``first_call_s``, ``seconds`` (one per repeat),
        ``median_s``, ``peak_extra_bytes``, ``peak_extra_measure`` and ``rss_delta_bytes``.
    """
    import torch

    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    result = call()
    first_seconds = time.perf_counter() - start
    rss_delta = peak_rss_bytes() - rss_before
    peak_extra = (torch.cuda.max_memory_allocated(device) - allocated_before) if on_cuda else rss_delta
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return result, {
        "first_call_s": first_seconds,
        "seconds": seconds,
        "median_s": median(seconds),
        "peak_extra_bytes": int(peak_extra),
        "peak_extra_measure": "cuda max_memory_allocated delta" if on_cuda else "ru_maxrss delta",
        "rss_delta_bytes": int(rss_delta),
    }


def machine_info() -> dict[str, Any]:
    """Host, CPU count, Python / torch versions, threads and GPU name (imports torch)."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_worker(
    script: str | Path,
    config: dict[str, Any],
    timeout_s: float = 900,
    env_overrides: dict[str, str] | None = None,
    in_process: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``script --worker '<config json>'`` in a fresh interpreter and return the JSON it reports.

    Args:
        script: path of the benchmark script (it must accept ``--worker``).
        config: JSON-serialisable configuration passed to the worker.
        timeout_s: wall-clock limit of the worker.
        env_overrides: environment variables set for the worker only (e.g. ``OMP_WAIT_POLICY``, which
            OpenMP reads once, when torch is imported).
        in_process: the worker function, to call it in THIS process instead (smoke tests: no interpreter
            start-up, but the peak RSS is then this process's, not the configuration's).

    Returns:
        The worker's result dictionary.

    Raises:
        RuntimeError: the worker failed, timed out or printed no result (the message holds its stderr tail).
    """
    if in_process is not None:
        result = in_process(json.loads(json.dumps(config)))
        return json.loads(json.dumps(result))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(env_overrides or {})
    command = [sys.executable, str(script), "--worker", json.dumps(config)]
    try:
        completed = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(
            f"{Path(script).name} worker timed out after {timeout_s:.0f} s for {config}"
        ) from error
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = "\n".join((completed.stderr or completed.stdout).splitlines()[-25:])
    raise RuntimeError(
        f"{Path(script).name} worker failed (exit code {completed.returncode}) for {config}:\n{tail}"
    )


def add_runner_args(parser: argparse.ArgumentParser, name: str, timeout_s: float = 600) -> None:
    """The flags every benchmark shares: ``--out``, ``--timeout``, ``--in_process``, hidden ``--worker``."""
    parser.add_argument("--out", default=default_out(name), help="JSON result file.")
    parser.add_argument(
        "--timeout", type=float, default=timeout_s, help="Seconds allowed per worker process."
    )
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="Measure in this process instead of one fresh process per configuration (quick "
        "smoke runs; the peak RSS is then not per configuration).",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def emit_result(result: dict[str, Any]) -> None:
    """Worker side of :func:`run_worker`: one marked JSON line on stdout."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table (Markdown pipe syntax, so it can be pasted into a report as is)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in text_rows)) if text_rows else len(str(h))
        for i, h in enumerate(headers)
    ]
    lines = [title] if title else []
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in text_rows:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return path


def gb(n_bytes: float | None) -> float | None:
    """Bytes to decimal GB, 1e9 bytes (None stays None)."""
    return None if n_bytes is None else n_bytes / GB
