"""Time and peak memory of the joint two-view clustering against batch size, tokens per view and k.

    python benchmarks/bench_clustering.py                                  # default grid, CPU
    python benchmarks/bench_clustering.py --configs 128x196x32 --device cuda
    python benchmarks/bench_clustering.py --configs 16x196x32 64x196x32 --dim 192 --repeats 5

Each configuration ``BxNxK`` (B images, N tokens per view, K clusters) runs in a fresh process:
random teacher tokens (B, N, D) for both views, patch positions of two random crops per image (the
closed form of ``data.augmentations``, checked against it in tests/test_benchmarks.py), then
``joint_cluster`` with the training defaults (5 rounds, Sinkhorn lambda 20 x 5 iterations, per-image cost
scaling). Reported: the median time of ``--repeats``
calls after one untimed call, and the peak extra memory of that first call: on CPU the growth of
``ru_maxrss`` over its value just before the call, on GPU ``max_memory_allocated`` minus the memory
allocated before the call.

The reference implementation builds the positional cost as (B, 2N, 2N, K) float32 tensors, several
alive at once in each round (docs/differences.md, difference 3); the "reference tensor" column is the size of
ONE such tensor, ``B (2N)^2 K x 4`` bytes: a lower bound of the reference's extra memory.
"""

from __future__ import annotations

import argparse
import json
import math
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
    peak_rss_bytes,
    run_worker,
    write_json,
)

NAME = "bench_clustering"
DEFAULT_CONFIGS = ("16x196x32", "64x196x32", "128x196x32", "16x49x32", "16x196x8", "16x196x64")
IMAGENET_SETTING = (128, 196, 32)  # ViT-S/16 ImageNet: 128 images per GPU, 14 x 14 tokens per view, k = 32


def parse_config(text: str) -> tuple[int, int, int]:
    """``"BxNxK"`` -> (B, N, K); N must be a square (a patch grid)."""
    try:
        batch, tokens, clusters = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--configs {text!r}: expected BxNxK, e.g. 128x196x32") from error
    if math.isqrt(tokens) ** 2 != tokens:
        raise argparse.ArgumentTypeError(
            f"--configs {text!r}: N={tokens} tokens per view must be a square grid"
        )
    if not 1 <= clusters <= 2 * tokens or batch < 1:
        raise argparse.ArgumentTypeError(f"--configs {text!r}: need B >= 1 and 1 <= K <= 2N")
    return batch, tokens, clusters


def reference_tensor_bytes(batch: int, tokens: int, clusters: int) -> int:
    """Bytes of one (B, 2N, 2N, K) float32 tensor of the reference's positional cost."""
    return batch * (2 * tokens) ** 2 * clusters * 4


# ---------------------------------------------------------------------------------------------- worker


def random_crop_positions(batch: int, side: int, patch_size: int, generator: Any) -> Any:
    """Patch-centre coordinates (B, 2, side^2) of random crops (area 10-60 %) of a 500 x 400 image.

    Closed form of ``data.augmentations`` (docs/method.md, Sec. 2.1), written out here so the benchmark needs
    no torchvision: ``x(b) = left + (p b + p/2) w / S - 1/2`` (columns reversed when flipped),
    ``y(a) = top + (p a + p/2) h / S - 1/2``, S = side * p, tokens row-major.
    """
    import torch

    def uniform(low: float, high: float) -> Any:
        return low + (high - low) * torch.rand(batch, 1, generator=generator, dtype=torch.float64)

    height, width = uniform(120, 380), uniform(120, 380)
    top, left = (400 - height) * uniform(0, 1), (500 - width) * uniform(0, 1)
    offsets = torch.arange(side, dtype=torch.float64) * patch_size + patch_size / 2
    x = left + offsets * width / (side * patch_size) - 0.5  # (B, side)
    y = top + offsets * height / (side * patch_size) - 0.5
    flipped = torch.rand(batch, 1, generator=generator) < 0.5
    x = torch.where(flipped, x.flip(-1), x)
    grid_x = x[:, None, :].expand(batch, side, side)
    grid_y = y[:, :, None].expand(batch, side, side)
    return torch.stack([grid_x, grid_y], dim=1).reshape(batch, 2, side * side).float()


def make_inputs(batch: int, tokens: int, dim: int, device: Any, seed: int = 0) -> tuple[Any, ...]:
    """Random teacher tokens of both views and the positions of two random crops per image."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    side = math.isqrt(tokens)
    positions = [random_crop_positions(batch, side, 16, generator).to(device) for _ in range(2)]
    views = [torch.randn(batch, tokens, dim, generator=generator).to(device) for _ in range(2)]
    return views[0], views[1], positions[0], positions[1]


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cribo_utils.method.clustering import joint_cluster

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    batch, tokens, clusters = cfg["batch"], cfg["tokens"], cfg["clusters"]
    tokens1, tokens2, positions1, positions2 = make_inputs(batch, tokens, cfg["dim"], device)
    generator = torch.Generator(device=device).manual_seed(0)

    def call() -> Any:
        result = joint_cluster(
            tokens1,
            tokens2,
            positions1,
            positions2,
            n_clusters=clusters,
            alpha=1.0,
            n_iter=cfg["n_iter"],
            cost_normalization=cfg["cost_normalization"],
            generator=generator,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    load_start = load_average()
    result, timing = measure_calls(call, device, cfg["repeats"])
    return {
        "config": cfg,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        **timing,
        "peak_rss_bytes": peak_rss_bytes(),
        "valid_clusters_per_image": float(result.counts.float().mean()),
        "reference_tensor_bytes": reference_tensor_bytes(batch, tokens, clusters),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


# ---------------------------------------------------------------------------------------------- parent


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of joint_cluster per BxNxK configuration (one process each).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=[parse_config(c) for c in DEFAULT_CONFIGS],
        help="BxNxK: images, tokens per view (a square), clusters. Default: " + " ".join(DEFAULT_CONFIGS),
    )
    parser.add_argument("--dim", type=int, default=384, help="Token width D (384: ViT-S).")
    parser.add_argument("--n_iter", type=int, default=5, help="Clustering rounds.")
    parser.add_argument("--cost_normalization", default="image", choices=["image", "batch"])
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls after the untimed first one.")
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
    for batch, tokens, clusters in options.configs:
        config = {
            "batch": batch,
            "tokens": tokens,
            "clusters": clusters,
            "dim": options.dim,
            "n_iter": options.n_iter,
            "cost_normalization": options.cost_normalization,
            "repeats": options.repeats,
            "device": options.device,
            "threads": options.threads,
        }
        result = run_worker(
            __file__, config, options.timeout, in_process=worker if options.in_process else None
        )
        results.append(result)
        reference = result["reference_tensor_bytes"]
        rows.append(
            [
                batch,
                tokens,
                clusters,
                options.dim,
                result["median_s"],
                gb(result["peak_extra_bytes"]),
                gb(reference),
                reference / max(result["peak_extra_bytes"], 1),
                result["valid_clusters_per_image"],
                "ImageNet ViT-S" if (batch, tokens, clusters) == IMAGENET_SETTING else "",
            ]
        )
    loads = [r[k] for r in results for k in ("load_average_start", "load_average_end")]
    title = (
        f"joint_cluster on {results[0]['device']} ({results[0]['torch_threads']} threads), {options.n_iter} "
        f"rounds, median of {options.repeats} calls; load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print(
        format_table(
            [
                "B",
                "N/view",
                "K",
                "D",
                "seconds",
                "peak extra GB (ours)",
                "one ref. (B,2N,2N,K) fp32 GB",
                "ref. tensor / ours",
                "valid clusters/img",
                "",
            ],
            rows,
            title=title,
        )
    )
    print(
        "  peak extra = " + results[0]["peak_extra_measure"] + " of the first call; the reference keeps "
        "several (B,2N,2N,K) tensors alive per round, so one tensor is a lower bound of its memory\n"
    )
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
