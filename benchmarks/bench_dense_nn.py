"""Throughput of the dense nearest-neighbour (Hummingbird) evaluation: building the memory and querying it.

    python benchmarks/bench_dense_nn.py                                      # defaults below, CPU
    python benchmarks/bench_dense_nn.py --memory_sizes 1024000 10240000  # the paper's size where RAM allows
    python benchmarks/bench_dense_nn.py --parts pipeline --arch vit_small --input_size 512 --n_train 32

Two parts, each in a fresh process:

1. ``pipeline`` (the real ``cribo_utils.eval.dense_nn`` code on synthetic segmentation scenes, a random-init
   or ``--weights`` backbone): memory images/s for data loading alone, for ``extract_memory_shard``
   (data + feature extraction + patch sampling), for ``assemble_memory`` (index add), and query
   images/s for ``evaluate_memory`` (data + features + search + label transfer + upsampling + scoring).
   Its memory is small (``n_train`` images x passes x patches): the search cost there is not the
   paper's.
2. ``index`` (RANDOM unit features, no network: clearly not a quality measurement): for each backend of
   ``--indexes`` (``torch``: chunked matmul + topk on ``--device``; ``exact``: faiss ``IndexFlatIP``;
   ``ivf``: faiss ``IndexIVFFlat``) and each world size W of ``--world_sizes``, one rank's shard of a
   ``--memory_size`` x D memory (``ceil(M / W)`` rows, added in chunks of 65,536 rows), then the search of
   ``--query_images`` x (input_size / p)^2 query patches with k neighbours against that shard: the
   queries/s of one rank and the memory one process holds (its index bytes and peak RSS). The sharded
   search's two all-gathers (queries, then k candidates per query) are not timed here: they move
   (Q D + 2 W Q k) numbers, small next to the (Q x M / W) similarity products. This is the part whose cost
   grows with the memory size: 1,024,000 patches, and the paper's 10,240,000 x 384 (15.7 GB of float32,
   divided by W) when the machine has the RAM (otherwise the size is reported as skipped, with the reason).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    peak_rss_bytes,
    run_worker,
    write_json,
)

NAME = "bench_dense_nn"
PAPER_MEMORY_SIZE = 10_240_000
WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
ADD_CHUNK_ROWS = 65536


def pipeline_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from cribo_utils.eval import dense_nn
    from data.synthetic import SyntheticSegmentation
    from models import build_backbone

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg["arch"], patch_size=cfg["patch_size"]).to(device).eval()
    if cfg.get("weights"):
        from cribo_utils.weights.checkpoint_formats import load_backbone

        load_backbone(backbone, cfg["weights"])
    train = SyntheticSegmentation(
        "train", image_size=cfg["scene_size"], num_train=cfg["n_train"], num_val=cfg["n_val"], seed=0
    )
    val = SyntheticSegmentation(
        "val", image_size=cfg["scene_size"], num_train=cfg["n_train"], num_val=cfg["n_val"], seed=0
    )
    config = dense_nn.DenseNNConfig(
        input_size=cfg["input_size"],
        memory_size=cfg["pipeline_memory_size"],
        num_neighbours=cfg["k"],
        augmentation_epochs=cfg["passes"],
        index=cfg["pipeline_index"],
        batch_size=cfg["batch_size"],
        num_workers=0,
        progress=False,
    )
    config.validate(cfg["patch_size"])
    side = cfg["input_size"] // cfg["patch_size"]
    plan = dense_nn.plan_memory(len(train), config.augmentation_epochs, side * side, config.memory_size)
    indices = dense_nn.training_subset(len(train), 1.0, config.seed)
    items = dense_nn.MemoryItems(
        train,
        indices,
        config.augmentation_epochs,
        dense_nn.memory_transform(config),
        side * side,
        config.seed,
    )
    n_items = len(items)
    load_start = load_average()

    start = time.perf_counter()
    for _ in DataLoader(items, batch_size=config.batch_size, num_workers=0):
        pass
    data_s = time.perf_counter() - start

    start = time.perf_counter()
    shard = dense_nn.extract_memory_shard(
        backbone, items, plan, cfg["patch_size"], train.num_classes, config, device
    )
    extract_s = time.perf_counter() - start

    start = time.perf_counter()
    memory = dense_nn.assemble_memory(shard, plan, config, device, indices)
    assemble_s = time.perf_counter() - start

    start = time.perf_counter()
    accumulator = dense_nn.evaluate_memory(backbone, memory, val, val.num_classes, config, device)
    query_s = time.perf_counter() - start
    scores = accumulator.compute(val.class_names, with_hungarian=False)
    return {
        "part": "pipeline",
        "config": cfg,
        "memory_entries": len(memory),
        "memory_items": n_items,
        "seconds": {
            "memory data only": data_s,
            "extract_memory_shard": extract_s,
            f"assemble_memory ({cfg['pipeline_index']} index add)": assemble_s,
            "evaluate_memory (query)": query_s,
        },
        "images_per_s": {
            "memory: data loading only": n_items / data_s,
            "memory: data + features + sampling": n_items / extract_s,
            "memory: features + sampling (excl. data)": n_items / max(extract_s - data_s, 1e-9),
            "memory: whole build (extract + index add)": n_items / (extract_s + assemble_s),
            "query: data + features + search + transfer + score": len(val) / query_s,
        },
        "index_add_rows_per_s": len(memory) / max(assemble_s, 1e-9),
        "miou_random_init": scores.get("miou"),
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def _build_shard_index(cfg: dict[str, Any], rows: int, generator: Any) -> tuple[Any, float, int]:
    """One rank's index of ``rows`` random unit features: (index, IVF training seconds, nlist)."""
    import torch
    import torch.nn.functional as F

    from cribo_utils.eval.dense_nn import PatchIndex, default_nlist
    from cribo_utils.eval.sharded_search import TorchShardIndex

    dim = cfg["dim"]
    if cfg["index"] == "torch":
        return TorchShardIndex(dim, torch.device(cfg["device"])), 0.0, 1
    nlist = default_nlist(cfg["memory_size"]) if cfg["index"] == "ivf" else 1
    index = PatchIndex(dim, cfg["index"], nlist=nlist, nprobe=cfg["nprobe"])
    train_s = 0.0
    if not index.is_trained:
        sample = F.normalize(torch.randn(min(rows, 64 * nlist), dim, generator=generator), dim=1)
        start = time.perf_counter()
        index.train(sample)
        train_s = time.perf_counter() - start
    return index, train_s, nlist


def index_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import math

    import torch
    import torch.nn.functional as F

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    size, dim, world_size = cfg["memory_size"], cfg["dim"], cfg["world_size"]
    rows = math.ceil(size / world_size)  # the largest shard of a world of W ranks
    generator = torch.Generator().manual_seed(0)
    load_start = load_average()
    index, train_s, nlist = _build_shard_index(cfg, rows, generator)
    generate_s = add_s = 0.0
    for first in range(0, rows, ADD_CHUNK_ROWS):
        start = time.perf_counter()
        chunk = F.normalize(torch.randn(min(ADD_CHUNK_ROWS, rows - first), dim, generator=generator), dim=1)
        generate_s += time.perf_counter() - start
        start = time.perf_counter()
        index.add(chunk)
        add_s += time.perf_counter() - start
    patches_per_image = (cfg["input_size"] // cfg["patch_size"]) ** 2
    queries = F.normalize(
        torch.randn(cfg["query_images"] * patches_per_image, dim, generator=generator), dim=1
    )
    index.search(queries[:8], cfg["k"])  # warm-up (thread pool, first-touch, CUDA kernels)
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    similarities, ids = index.search(queries, cfg["k"])
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
    search_s = time.perf_counter() - start
    return {
        "part": "index",
        "config": cfg,
        "features": "random unit vectors (timing only)",
        "memory_size": size,
        "world_size": world_size,
        "rows_per_process": rows,
        "index_bytes_per_process": rows * dim * 4 + (rows * 8 if cfg["index"] == "ivf" else 0),
        "ivf_nlist": nlist if cfg["index"] == "ivf" else None,
        "ivf_train_s": train_s,
        "seconds": {"generate random features": generate_s, "index add": add_s, "search": search_s},
        "add_rows_per_s": rows / max(add_s, 1e-9),
        "search_queries": int(queries.shape[0]),
        "search_queries_per_s": queries.shape[0] / search_s,
        "query_images_per_s": cfg["query_images"] / search_s,
        "found_all": bool((ids >= 0).all()),
        "peak_rss_bytes": peak_rss_bytes(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def run_part(cfg: dict[str, Any]) -> dict[str, Any]:
    return pipeline_worker(cfg) if cfg["part"] == "pipeline" else index_worker(cfg)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Images/s of the dense-NN memory build and query (real pipeline) and queries/s and "
        "memory per process of the torch and faiss searches of a sharded memory (random features).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--parts", nargs="+", default=["pipeline", "index"], choices=["pipeline", "index"])
    parser.add_argument("--arch", default="vit_small", choices=sorted(WIDTHS))
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument(
        "--weights", default="", help="Backbone checkpoint for the pipeline part (default: random)."
    )
    parser.add_argument(
        "--input_size", type=int, default=512, help="Network input side (512 in the protocol)."
    )
    parser.add_argument("--n_train", type=int, default=8, help="Pipeline: training images in the memory.")
    parser.add_argument("--n_val", type=int, default=4, help="Pipeline: validation (query) images.")
    parser.add_argument(
        "--passes", type=int, default=1, help="Pipeline: augmentation passes over the memory images."
    )
    parser.add_argument(
        "--pipeline_memory_size",
        type=int,
        default=0,
        help="Pipeline: --memory_size of the protocol (0: keep every patch).",
    )
    parser.add_argument("--scene_size", type=int, default=128, help="Side of the synthetic scenes.")
    parser.add_argument("--batch_size", type=int, default=4, help="Pipeline: images per forward pass.")
    parser.add_argument(
        "--memory_sizes",
        nargs="+",
        type=int,
        default=[1_024_000, PAPER_MEMORY_SIZE],
        help="Index part: memory sizes in patches (sizes that do not fit in RAM are skipped).",
    )
    parser.add_argument("--dim", type=int, default=0, help="Index part: feature width (0: the --arch width).")
    parser.add_argument(
        "--indexes",
        nargs="+",
        default=["torch", "exact"],
        choices=["torch", "exact", "ivf"],
        help="Index part: search backends compared side by side.",
    )
    parser.add_argument(
        "--world_sizes",
        nargs="+",
        type=int,
        default=[1, 2],
        help="Index part: processes the memory is sharded over (one rank's shard is measured).",
    )
    parser.add_argument(
        "--pipeline_index", default="torch", choices=["torch", "exact", "ivf"], help="Pipeline: backend."
    )
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists searched.")
    parser.add_argument(
        "--query_images",
        type=int,
        default=1,
        help="Index part: query images, (input_size / patch_size)^2 patches each.",
    )
    parser.add_argument("--k", type=int, default=30, help="Neighbours per query patch.")
    parser.add_argument(
        "--max_ram_fraction",
        type=float,
        default=0.6,
        help="Skip an index size needing more than this fraction of the available RAM (MemAvailable, "
        "capped by the cgroup limit).",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    add_runner_args(parser, NAME, timeout_s=1200)
    return parser


def available_bytes() -> int | None:
    import torch

    from cribo_utils.train.resources import available_memory

    probe = available_memory(torch.device("cpu"))
    return probe[0] if probe is not None else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = get_parser().parse_args(argv)
    if options.worker:
        emit_result(run_part(json.loads(options.worker)))
        return {}
    dim = options.dim or WIDTHS[options.arch]
    common = {
        "arch": options.arch,
        "patch_size": options.patch_size,
        "input_size": options.input_size,
        "k": options.k,
        "device": options.device,
        "threads": options.threads,
    }
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if "pipeline" in options.parts:
        cfg = {
            **common,
            "part": "pipeline",
            "weights": options.weights,
            "n_train": options.n_train,
            "n_val": options.n_val,
            "passes": options.passes,
            "scene_size": options.scene_size,
            "batch_size": options.batch_size,
            "pipeline_memory_size": options.pipeline_memory_size or None,
            "pipeline_index": options.pipeline_index,
        }
        result = run_worker(
            __file__, cfg, options.timeout, in_process=run_part if options.in_process else None
        )
        results.append(result)
        rows = [[stage, rate] for stage, rate in result["images_per_s"].items()]
        rows.append(["index add (rows/s)", result["index_add_rows_per_s"]])
        title = (
            f"dense-NN pipeline: {options.arch}/{options.patch_size} at {options.input_size} px "
            f"({'weights ' + options.weights if options.weights else 'random init'}), memory of "
            f"{result['memory_entries']} patches from {result['memory_items']} items, {options.n_val} query "
            f"images, k={options.k}; load {result['load_average_start']:.2f}-{result['load_average_end']:.2f}"
        )
        print(format_table(["stage", "images/s"], rows, title=title))
        print(f"  peak RSS {gb(result['peak_rss_bytes']):.2f} GB\n")
    if "index" in options.parts:
        rows = []
        for size in options.memory_sizes:
            for world_size in options.world_sizes:
                shard_bytes = -(-size // world_size) * dim * 4
                available = available_bytes()
                if available is not None and shard_bytes > options.max_ram_fraction * available:
                    reason = (
                        f"needs {gb(shard_bytes):.1f} GB per process for the float32 shard, "
                        f"{gb(available):.1f} GB available (limit {options.max_ram_fraction:.0%}); use more "
                        "processes (--world_sizes) or a machine with more RAM"
                    )
                    skipped.append(
                        {"memory_size": size, "world_size": world_size, "dim": dim, "reason": reason}
                    )
                    rows.append([size, world_size, "-", gb(shard_bytes), None, None, "skipped: " + reason])
                    continue
                for index in options.indexes:
                    cfg = {
                        **common,
                        "part": "index",
                        "memory_size": size,
                        "world_size": world_size,
                        "dim": dim,
                        "index": index,
                        "nprobe": options.nprobe,
                        "query_images": options.query_images,
                    }
                    result = run_worker(
                        __file__, cfg, options.timeout, in_process=run_part if options.in_process else None
                    )
                    results.append(result)
                    rows.append(
                        [
                            size,
                            world_size,
                            index,
                            gb(result["index_bytes_per_process"]),
                            result["search_queries_per_s"],
                            gb(result["peak_rss_bytes"]),
                            f"add {result['add_rows_per_s']:.0f} rows/s, load "
                            f"{result['load_average_start']:.2f}-{result['load_average_end']:.2f}",
                        ]
                    )
        print(
            format_table(
                [
                    "memory patches",
                    "W",
                    "index",
                    "index GB / process",
                    "search queries/s (one rank)",
                    "peak RSS GB",
                    "notes",
                ],
                rows,
                title=f"sharded search on RANDOM unit features (timing only), D={dim}, k={options.k}, "
                f"{options.device}",
            )
        )
        print()
    payload = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        "results": results,
        "skipped": skipped,
    }
    print(f"wrote {write_json(options.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
