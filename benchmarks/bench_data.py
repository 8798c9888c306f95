"""Images per second of the two-view pretraining pipeline in ONE data-loading worker.

    python benchmarks/bench_data.py                          # synthetic scenes + JPEG files, 224 and 96 px
    python benchmarks/bench_data.py --sources jpeg --data_dir /tmp/synthetic_export --scene_size 256

A DataLoader worker runs with one torch thread, so each measurement runs in a fresh process with
``torch.set_num_threads(1)`` (``--threads``). Stages, per image:

* ``synthetic``: render a scene (``SyntheticScenes``, no transform) / ``TwoViewTransform`` on an already
  rendered PIL image / both, as ``SyntheticScenes(transform=TwoViewTransform)`` does in training;
* ``jpeg``: decode a JPEG exported with ``python -m data.synthetic`` (``data.datasets.load_image``) /
  ``TwoViewTransform`` on the decoded image / both (``UnlabelledImageFolder(transform=...)``).

End-to-end rows also include ``default_collate`` of the batches. "Workers for N images/s" divides a
training throughput by the end-to-end rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    ROOT,
    add_runner_args,
    emit_result,
    format_table,
    load_average,
    machine_info,
    run_worker,
    write_json,
)

NAME = "bench_data"


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import random

    import torch
    from torch.utils.data import default_collate

    from data.augmentations import TwoViewTransform

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    random.seed(0)
    count, batch_size = cfg["n_images"], cfg["batch_size"]
    transform = TwoViewTransform(image_size=cfg["image_size"], patch_size=16)
    load_start = load_average()
    raw: Any
    full: Any
    if cfg["source"] == "synthetic":
        from data.synthetic import SyntheticScenes

        raw = SyntheticScenes("train", image_size=cfg["scene_size"], num_train=count, seed=0)
        full = SyntheticScenes(
            "train", image_size=cfg["scene_size"], num_train=count, seed=0, transform=transform
        )
        read_label = "render scene"
    else:
        from data.datasets import UnlabelledImageFolder

        folder = Path(cfg["data_dir"]) / "VOC2012" / "JPEGImages"
        raw = UnlabelledImageFolder(folder)
        full = UnlabelledImageFolder(folder, transform=transform)
        count = min(count, len(raw))
        read_label = "decode JPEG"

    start = time.perf_counter()
    images = [raw[i][0] for i in range(count)]
    read_s = time.perf_counter() - start

    start = time.perf_counter()
    for image in images:
        transform(image)
    transform_s = time.perf_counter() - start

    start = time.perf_counter()
    for first in range(0, count, batch_size):
        default_collate([full[i] for i in range(first, min(first + batch_size, count))])
    end_to_end_s = time.perf_counter() - start
    return {
        "config": cfg,
        "n_images": count,
        "source_image_size": list(images[0].size),
        "stages": {
            read_label: _rate(count, read_s),
            "TwoViewTransform": _rate(count, transform_s),
            "end to end (+ collate)": _rate(count, end_to_end_s),
        },
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def export_jpegs(out_dir: Path, count: int, scene_size: int) -> float:
    """``python -m data.synthetic`` into ``out_dir``; returns the seconds it took."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data.synthetic",
            "--out",
            str(out_dir),
            "--num_train",
            str(count),
            "--num_val",
            "1",
            "--image_size",
            str(scene_size),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Images/s of the two-view pipeline per data-loading worker (a process per measurement).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sources", nargs="+", default=["synthetic", "jpeg"], choices=["synthetic", "jpeg"])
    parser.add_argument("--image_sizes", nargs="+", type=int, default=[224, 96], help="Global crop sides.")
    parser.add_argument(
        "--scene_size",
        type=int,
        default=128,
        help="Side of the synthetic scenes (rendered, and exported as JPEG).",
    )
    parser.add_argument("--n_images", type=int, default=64, help="Images per measurement.")
    parser.add_argument("--batch_size", type=int, default=16, help="Collate batch size (end-to-end rows).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1).")
    parser.add_argument(
        "--data_dir",
        default="",
        help="An existing `python -m data.synthetic` export to read (default: export "
        "--n_images images into a temporary folder first).",
    )
    parser.add_argument(
        "--feed_rate",
        type=float,
        default=1000.0,
        help="Training images/s to feed, for the 'workers needed' column.",
    )
    add_runner_args(parser, NAME, timeout_s=600)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = get_parser().parse_args(argv)
    if options.worker:
        emit_result(worker(json.loads(options.worker)))
        return {}
    results: list[dict[str, Any]] = []
    export_s = None
    with tempfile.TemporaryDirectory(prefix="bench_data_") as scratch:
        data_dir = options.data_dir
        if "jpeg" in options.sources and not data_dir:
            data_dir = str(Path(scratch) / "export")
            export_s = export_jpegs(Path(data_dir), options.n_images, options.scene_size)
        for source in options.sources:
            for image_size in options.image_sizes:
                config = {
                    "source": source,
                    "image_size": image_size,
                    "scene_size": options.scene_size,
                    "n_images": options.n_images,
                    "batch_size": options.batch_size,
                    "threads": options.threads,
                    "data_dir": data_dir,
                }
                results.append(
                    run_worker(
                        __file__, config, options.timeout, in_process=worker if options.in_process else None
                    )
                )
    rows = []
    for result in results:
        config = result["config"]
        for stage, rate in result["stages"].items():
            workers = options.feed_rate / rate if stage.startswith("end to end") else None
            rows.append(
                [
                    config["source"],
                    "x".join(map(str, result["source_image_size"])),
                    config["image_size"],
                    stage,
                    rate,
                    1000.0 / rate,
                    workers,
                ]
            )
    loads = [r[k] for r in results for k in ("load_average_start", "load_average_end")]
    title = (
        f"two-view pipeline, one worker ({results[0]['torch_threads']} torch thread), "
        f"{options.n_images} images per row; load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print(
        format_table(
            [
                "source",
                "source px",
                "crop px",
                "stage",
                "images/s",
                "ms/image",
                f"workers for {options.feed_rate:.0f} img/s",
            ],
            rows,
            title=title,
        )
    )
    if export_s is not None:
        print(f"  JPEG export (python -m data.synthetic, {options.n_images} + 1 images): {export_s:.1f} s\n")
    payload = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        "jpeg_export_seconds": export_s,
        "results": results,
    }
    print(f"wrote {write_json(options.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
