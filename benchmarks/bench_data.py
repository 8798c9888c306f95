"""Images per second of the two-view pretraining pipeline per data-loading worker, old and new side by side.

    python benchmarks/bench_data.py                                  # ImageNet-like JPEGs, 224 and 96 px
    python benchmarks/bench_data.py --sources imagenet_like synthetic --loader_workers 1 2

Sources:

* ``imagenet_like``: JPEG files of ``--jpeg_size`` (500 x 375, ImageNet's typical size) at quality
  ``--jpeg_quality`` (90), generated on the fly with natural-image statistics (:func:`natural_image`: a
  1/f amplitude spectrum, correlated colour channels, and opaque shapes with sharp edges), nothing downloaded;
* ``synthetic``: the built-in synthetic scenes (``SyntheticScenes``), rendered per item;
* ``jpeg``: a ``python -m data.synthetic`` export of those scenes (small JPEGs, cheap to decode).

Pipelines (``--augment_on``): ``workers`` is the reference (PIL photometric stages and float32 views in
the worker), ``device`` the default (the worker decodes, crops, flips, draws the photometric parameters and
sends uint8 views; ``data.batched_photometric`` applies them on the training device, timed by
``bench_photometric.py``). Every configuration runs in a fresh process with one torch thread, as a
DataLoader worker does, and reports per image:

* CPU milliseconds by stage (``time.process_time``): read (decode or render), crop + flip of both views,
  photometric (PIL ops, or drawing the parameters), to tensor, collate;
* end-to-end images/s of one worker: ``dataset[i]`` with the real ``TwoViewTransform`` plus collation;
* bytes per image sent to the device (views, coordinates and parameters of a collated batch);
* the training loader's images/s with N worker processes (``--loader_workers``; ``PerSampleSeededDataset``
  in a ``DataLoader``, as in training, including the workers' start-up).

"Workers for N img/s" divides ``--feed_rate`` (default 710: the measured H100 ViT-S/16 bf16 step at batch 64,
README Benchmarks) by the per-worker end-to-end rate in CPU time (1000 / end-to-end CPU ms: what one worker
delivers with a core to itself; wall-time rates are printed too, but other processes move them).
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
STAGES = ("read", "crop + flip", "photometric", "to tensor", "collate")
# The ImageNet-like JPEGs: width, height (ImageNet's typical 500 x 375) and JPEG quality.
IMAGENET_LIKE_SIZE = (500, 375)
IMAGENET_LIKE_QUALITY = 90


def natural_image(rng: Any, height: int, width: int) -> Any:
    """(H, W, 3) uint8 with natural-image statistics: a 1/f amplitude spectrum and occluding shapes.

    A colour field whose amplitude falls as 1/f (the power-law spectrum of photographs), mixed across
    channels so colours are correlated, overlaid with a few opaque ellipses of their own textured colour
    (sharp occlusion edges, which cost JPEG bits as real object boundaries do).
    """
    import numpy as np

    freq_y = np.fft.fftfreq(height)[:, None]
    freq_x = np.fft.rfftfreq(width)[None]
    amplitude = 1.0 / np.maximum(np.hypot(freq_x, freq_y), 1.0 / max(height, width))
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, size=amplitude.shape)
        field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        channels.append((field - field.mean()) / field.std())
    image = np.stack(channels, axis=-1) @ rng.normal(size=(3, 3)) * 0.25 + rng.uniform(-0.4, 0.4, size=3)
    rows, cols = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(3, 8)):
        centre_y, centre_x = rng.uniform(0, height), rng.uniform(0, width)
        radius_y, radius_x = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        inside = ((rows - centre_y) / radius_y) ** 2 + ((cols - centre_x) / radius_x) ** 2 < 1
        image[inside] = image[inside] * 0.3 + rng.uniform(-0.8, 0.8, size=3)
    return np.clip(image * 64 + 128, 0, 255).astype(np.uint8)


def write_imagenet_like(out_dir: Path, count: int, width: int, height: int, quality: int) -> float:
    """Write ``count`` :func:`natural_image` JPEGs into ``out_dir``; returns their mean file size in bytes."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = []
    for index in range(count):
        path = out_dir / f"image_{index:05d}.JPEG"
        Image.fromarray(natural_image(rng, height, width)).save(path, "JPEG", quality=quality)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes))


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


def _nbytes(item: Any) -> int:
    """Bytes of every tensor in a nested list / tuple."""
    if isinstance(item, (list, tuple)):
        return sum(_nbytes(part) for part in item)
    return int(item.numel() * item.element_size())


def _source_dataset(cfg: dict[str, Any], transform: Any) -> Any:
    """The dataset of ``cfg['source']`` (with ``transform``, or raw when it is None)."""
    if cfg["source"] == "synthetic":
        from data.synthetic import SyntheticScenes

        return SyntheticScenes(
            "train", image_size=cfg["scene_size"], num_train=cfg["n_images"], seed=0, transform=transform
        )
    from data.datasets import UnlabelledImageFolder

    return UnlabelledImageFolder(cfg["folder"], transform=transform)


def _stage_times(transform: Any, raw: Any, count: int, batch_size: int) -> tuple[dict[str, float], Any]:
    """CPU seconds of each stage over ``count`` images (the steps of ``TwoViewTransform.__call__``)."""
    import torchvision.transforms.functional as F
    from torch.utils.data import default_collate

    from data.augmentations import _renderings

    seconds = dict.fromkeys(STAGES, 0.0)
    samples = []
    on_device = transform.augment_on == "device"
    for index in range(count):
        start = time.process_time()
        renderings = _renderings(raw[index][0])
        seconds["read"] += time.process_time() - start
        start = time.process_time()
        views = [transform.global_crop(renderings[v % len(renderings)]) for v in range(2)]
        seconds["crop + flip"] += time.process_time() - start
        start = time.process_time()
        if on_device:
            params = [transform.global_samplers[v].sample() for v in range(2)]
        else:
            pil_views = [transform.global_photometric[v](views[v][0]) for v in range(2)]
        seconds["photometric"] += time.process_time() - start
        start = time.process_time()
        if on_device:
            crops = [F.pil_to_tensor(view) for view, _ in views]
        else:
            crops = [transform.to_tensor(view) for view in pil_views]
        seconds["to tensor"] += time.process_time() - start
        positions = [coords for _, coords in views]
        samples.append(((crops, positions, params) if on_device else (crops, positions), 0))
    start = time.process_time()
    batches = [default_collate(samples[i : i + batch_size]) for i in range(0, count, batch_size)]
    seconds["collate"] = time.process_time() - start
    return seconds, batches[0]


def _loader_rate(dataset: Any, batch_size: int, workers: int, count: int) -> dict[str, float]:
    """images/s of the training DataLoader over ``count`` images with ``workers`` processes."""
    import torch

    from data.loading import PerSampleSeededDataset

    seeded = PerSampleSeededDataset(dataset, seed=0, transform=dataset.transform)
    dataset.transform = None  # the wrapper applies it (after seeding), as in training
    loader = torch.utils.data.DataLoader(
        seeded, batch_size=batch_size, num_workers=workers, drop_last=True, shuffle=False
    )
    start = time.perf_counter()
    seen = 0
    first_batch_s = None
    for batch in loader:
        seen += batch[0][0][0].shape[0]
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
    total_s = time.perf_counter() - start
    dataset.transform = seeded.transform
    return {
        "workers": workers,
        "images": seen,
        "images_per_s": seen / total_s,
        "images_per_s_after_first_batch": (seen - batch_size) / max(total_s - first_batch_s, 1e-9),
    }


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import random

    import torch
    from torch.utils.data import default_collate

    from data.augmentations import TwoViewTransform

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    random.seed(0)
    transform = TwoViewTransform(image_size=cfg["image_size"], patch_size=16, augment_on=cfg["augment_on"])
    load_start = load_average()
    raw = _source_dataset(cfg, None)
    full = _source_dataset(cfg, transform)
    count, batch_size = min(cfg["n_images"], len(raw)), cfg["batch_size"]
    first = raw[0][0]
    source_size = list((first[0] if isinstance(first, (list, tuple)) else first).size)

    stage_seconds, first_batch = _stage_times(transform, raw, count, batch_size)

    start = time.perf_counter()
    cpu_start = time.process_time()
    for first_index in range(0, count, batch_size):
        default_collate([full[i] for i in range(first_index, min(first_index + batch_size, count))])
    end_to_end_s = time.perf_counter() - start
    end_to_end_cpu_s = time.process_time() - cpu_start

    loaders = [_loader_rate(full, batch_size, workers, count) for workers in cfg["loader_workers"]]
    batch_images = first_batch[0][0][0].shape[0]
    return {
        "config": cfg,
        "n_images": count,
        "source_image_size": source_size,
        "cpu_ms_per_image": {stage: 1e3 * s / count for stage, s in stage_seconds.items()},
        "end_to_end_images_per_s": count / end_to_end_s,
        "end_to_end_cpu_ms_per_image": 1e3 * end_to_end_cpu_s / count,
        "bytes_per_image_to_device": _nbytes(first_batch[0]) / batch_images,
        "loader": loaders,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Images/s of the two-view pipeline per data-loading worker, old (--augment_on workers) "
        "and new (device) side by side (a process per measurement).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sources", nargs="+", default=["imagenet_like"], choices=["imagenet_like", "synthetic", "jpeg"]
    )
    parser.add_argument("--image_sizes", nargs="+", type=int, default=[224, 96], help="Global crop sides.")
    parser.add_argument(
        "--augment_on", nargs="+", default=["workers", "device"], choices=["workers", "device"]
    )
    parser.add_argument(
        "--jpeg_size", nargs=2, type=int, default=list(IMAGENET_LIKE_SIZE), help="Width and height."
    )
    parser.add_argument("--jpeg_quality", type=int, default=IMAGENET_LIKE_QUALITY)
    parser.add_argument(
        "--scene_size",
        type=int,
        default=128,
        help="Side of the synthetic scenes (rendered, and exported as JPEG).",
    )
    parser.add_argument("--n_images", type=int, default=64, help="Images per measurement.")
    parser.add_argument("--batch_size", type=int, default=16, help="Collate batch size.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1).")
    parser.add_argument(
        "--loader_workers",
        nargs="*",
        type=int,
        default=[2],
        help="DataLoader worker counts for the end-to-end loader rows (none: skip them).",
    )
    parser.add_argument(
        "--data_dir",
        default="",
        help="An existing `python -m data.synthetic` export to read for --sources jpeg (default: export "
        "--n_images images into a temporary folder first).",
    )
    parser.add_argument(
        "--feed_rate",
        type=float,
        default=710.0,
        help="Training images/s to feed, for the 'workers needed' column (710: the H100 ViT-S/16 step).",
    )
    add_runner_args(parser, NAME, timeout_s=900)
    return parser


def _prepare_sources(options: argparse.Namespace, scratch: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Folders of the file sources, and what it took to write them."""
    folders: dict[str, str] = {}
    notes: dict[str, Any] = {}
    if "imagenet_like" in options.sources:
        folder = scratch / "imagenet_like"
        width, height = options.jpeg_size
        start = time.perf_counter()
        notes["imagenet_like_mean_file_bytes"] = write_imagenet_like(
            folder, options.n_images, width, height, options.jpeg_quality
        )
        notes["imagenet_like_generation_seconds"] = time.perf_counter() - start
        folders["imagenet_like"] = str(folder)
    if "jpeg" in options.sources:
        data_dir = options.data_dir
        if not data_dir:
            data_dir = str(scratch / "export")
            notes["jpeg_export_seconds"] = export_jpegs(Path(data_dir), options.n_images, options.scene_size)
        folders["jpeg"] = str(Path(data_dir) / "VOC2012" / "JPEGImages")
    return folders, notes


def print_tables(options: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    rows = []
    for result in results:
        config = result["config"]
        rate = result["end_to_end_images_per_s"]
        rows.append(
            [
                config["source"],
                "x".join(map(str, result["source_image_size"])),
                config["image_size"],
                config["augment_on"],
                *[result["cpu_ms_per_image"][stage] for stage in STAGES],
                result["end_to_end_cpu_ms_per_image"],
                1e3 / result["end_to_end_cpu_ms_per_image"],
                rate,
                result["bytes_per_image_to_device"] / 1e3,
                options.feed_rate * result["end_to_end_cpu_ms_per_image"] / 1e3,
                *[loader["images_per_s"] for loader in result["loader"]],
            ]
        )
    loads = [r[k] for r in results for k in ("load_average_start", "load_average_end")]
    title = (
        f"two-view pipeline per data-loading worker ({results[0]['torch_threads']} torch thread), "
        f"{results[0]['n_images']} images per row; CPU ms per image by stage; load average "
        f"{min(loads):.2f}-{max(loads):.2f}"
    )
    headers = [
        "source",
        "source px",
        "crop px",
        "augment_on",
        *[f"{stage} ms" for stage in STAGES],
        "end to end ms",
        "images/s per worker (CPU time)",
        "images/s per worker (wall)",
        "kB/image to device",
        f"workers for {options.feed_rate:.0f} img/s",
        *[f"loader, {n} workers, img/s" for n in options.loader_workers],
    ]
    print(format_table(headers, rows, title=title))
    by_key = {
        (r["config"]["source"], r["config"]["image_size"], r["config"]["augment_on"]): r for r in results
    }
    for (source, size, augment_on), result in by_key.items():
        old = by_key.get((source, size, "workers"))
        if augment_on == "device" and old is not None:
            wall = result["end_to_end_images_per_s"] / old["end_to_end_images_per_s"]
            cpu = old["end_to_end_cpu_ms_per_image"] / result["end_to_end_cpu_ms_per_image"]
            print(
                f"  {source} {size} px: device / workers pipeline per worker = {cpu:.2f}x in CPU time "
                f"({wall:.2f}x in wall time, which other processes on the machine also move)"
            )
    print()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = get_parser().parse_args(argv)
    if options.worker:
        emit_result(worker(json.loads(options.worker)))
        return {}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as scratch:
        folders, notes = _prepare_sources(options, Path(scratch))
        for source in options.sources:
            for image_size in options.image_sizes:
                for augment_on in options.augment_on:  # old and new back to back, in the same load
                    config = {
                        "source": source,
                        "folder": folders.get(source, ""),
                        "image_size": image_size,
                        "augment_on": augment_on,
                        "scene_size": options.scene_size,
                        "n_images": options.n_images,
                        "batch_size": options.batch_size,
                        "threads": options.threads,
                        "loader_workers": options.loader_workers,
                    }
                    results.append(
                        run_worker(
                            __file__,
                            config,
                            options.timeout,
                            in_process=worker if options.in_process else None,
                        )
                    )
    print_tables(options, results)
    payload = {
        "benchmark": NAME,
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        **notes,
        "results": results,
    }
    print(f"wrote {write_json(options.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
