"""Time and peak extra memory of the cross-image retrieval against the memory-bank size.

    python benchmarks/bench_retrieval.py                         # queues of 1,024 and 8,192 images, CPU
    python benchmarks/bench_retrieval.py --queue_sizes 25000 --device cuda

Each queue size runs in a fresh process: a ``CentroidMemoryBank(Q, K, D)`` is filled with Q images of K
random objects (pushed one batch of images at a time, as training does), then
``find_cycle_consistent_neighbours`` is called for M current objects with the training chunk size.
Peak extra memory of the first call: ``ru_maxrss`` growth on CPU, ``max_memory_allocated`` minus the
allocated memory before the call on GPU. A retrieval that copied the bank would need at least one
view of it, ``Q K D x 4`` bytes (column "one bank view"); the chunked search needs the (M, chunk)
float32 similarity block, ``M min(chunk, Q K) x 4`` bytes, and no (chunk, D) copy. Once the bank holds
more than one chunk, the extra memory stops growing with Q.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    add_runner_args,
    emit_result,
    format_table,
    gb,
    load_average,
    machine_info,
    measure_calls,
    run_worker,
    write_json,
)

NAME = "bench_retrieval"


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.bench_train_step import fill_bank
    from cribo_utils.method.memory_bank import CentroidMemoryBank
    from cribo_utils.method.neighbours import find_cycle_consistent_neighbours

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    bank = CentroidMemoryBank(cfg["queue_size"], cfg["n_tokens"], cfg["dim"]).to(device)
    fill_bank(bank, cfg["push_images"])
    generator = torch.Generator().manual_seed(2)
    objects = torch.randn(2, cfg["objects"], cfg["dim"], generator=generator).to(device)
    load_start = load_average()

    def call() -> Any:
        result = find_cycle_consistent_neighbours(objects[0], objects[1], bank, chunk_size=cfg["chunk_size"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    result, timing = measure_calls(call, device, cfg["repeats"])
    view_bytes = bank.num_objects * cfg["dim"] * 4
    return {
        "config": cfg,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "bank_objects": bank.num_objects,
        "bank_bytes": 2 * bank.capacity * cfg["dim"] * 4,
        "one_view_bytes": view_bytes,
        "similarity_block_bytes": cfg["objects"] * min(cfg["chunk_size"], bank.num_objects) * 4,
        **timing,
        "cycle_consistent_fraction": float(result.mask1.float().mean()),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time and peak extra memory of find_cycle_consistent_neighbours per bank size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--queue_sizes", nargs="+", type=int, default=[1024, 8192], help="Bank sizes Q in images."
    )
    parser.add_argument("--n_tokens", type=int, default=32, help="Objects per bank image (K, all valid).")
    parser.add_argument("--dim", type=int, default=384, help="Object width D (384: ViT-S).")
    parser.add_argument(
        "--objects", type=int, default=320, help="Current objects M (e.g. 16 images x 20 valid objects)."
    )
    parser.add_argument("--chunk_size", type=int, default=65536, help="--retrieval_chunk_size of training.")
    parser.add_argument("--push_images", type=int, default=16, help="Images per push while filling the bank.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls after the first one.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    add_runner_args(parser, NAME, timeout_s=600)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = get_parser().parse_args(argv)
    if options.worker:
        emit_result(worker(json.loads(options.worker)))
        return {}
    results, rows = [], []
    for queue_size in options.queue_sizes:
        config = {
            "queue_size": queue_size,
            "n_tokens": options.n_tokens,
            "dim": options.dim,
            "objects": options.objects,
            "chunk_size": options.chunk_size,
            "push_images": options.push_images,
            "repeats": options.repeats,
            "device": options.device,
            "threads": options.threads,
        }
        result = run_worker(
            __file__, config, options.timeout, in_process=worker if options.in_process else None
        )
        results.append(result)
        rows.append(
            [
                queue_size,
                result["bank_objects"],
                gb(result["bank_bytes"]),
                gb(result["one_view_bytes"]),
                gb(result["peak_extra_bytes"]),
                gb(result["similarity_block_bytes"]),
                result["peak_extra_bytes"] / result["one_view_bytes"],
                result["median_s"],
            ]
        )
    loads = [r[k] for r in results for k in ("load_average_start", "load_average_end")]
    title = (
        f"retrieval of M={options.objects} objects, D={options.dim}, chunk {options.chunk_size}, on "
        f"{results[0]['device']}; median of {options.repeats} calls; load {min(loads):.2f}-{max(loads):.2f}"
    )
    print(
        format_table(
            [
                "Q images",
                "bank objects",
                "bank GB (2 views)",
                "one bank view GB",
                "peak extra GB",
                "(M, chunk) block GB",
                "extra / one view",
                "seconds",
            ],
            rows,
            title=title,
        )
    )
    print("  peak extra = " + results[0]["peak_extra_measure"] + " of the first call\n")
    payload = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        "results": results,
    }
    print(f"wrote {write_json(options.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
