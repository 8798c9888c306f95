"""Seconds per batch of the device-side photometric augmentation, and the libraries it was chosen against.

    python benchmarks/bench_photometric.py                               # CPU, batch 16 (32 views), 224 px
    python benchmarks/bench_photometric.py --device cuda --batch_size 128 # a GPU, the released batch

Each implementation applies DINO's two view pipelines (colour jitter p 0.8, grayscale 0.2, blur p 1.0 / 0.1,
solarisation 0 / 0.2, ImageNet normalisation) to 2B uint8 views of ``--image_size`` px:

* ``ours``: ``data.batched_photometric.apply_photometric`` (torchvision's tensor formulas, per-sample
  factors and per-sample jitter order, vectorised over the batch; parameters drawn as the workers draw them);
* ``kornia``: ``kornia.augmentation`` ColorJitter / RandomGrayscale / RandomGaussianBlur / RandomSolarize /
  Normalize on the batch (if kornia is installed). Its jitter order is drawn once per call, i.e. shared by
  the whole batch, which is not the per-image order of the PIL pipeline;
* ``torchvision_v2``: ``torchvision.transforms.v2.functional`` ops, which take one scalar factor per call,
  so they run image by image (a Python loop over the batch);
* ``pil_per_image``: the current worker-side PIL pipeline on the same views, one image at a time.

Each configuration runs in a fresh process; the median of ``--repeats`` calls after one warm-up is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    add_runner_args,
    emit_result,
    format_table,
    load_average,
    machine_info,
    median,
    run_worker,
    write_json,
)

NAME = "bench_photometric"
IMPLEMENTATIONS = ("ours", "kornia", "torchvision_v2", "pil_per_image")


def _views_and_params(batch_size: int, image_size: int) -> tuple[Any, Any]:
    """(2B, 3, S, S) uint8 smooth random views and their (2B, P) parameters (view 1 then view 2)."""
    import torch

    from data.augmentations import view_photometric_configs
    from data.batched_photometric import PhotometricSampler

    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(2 * batch_size, 3, image_size // 8, image_size // 8, generator=generator)
    views = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear")
    views = (views * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    samplers = [PhotometricSampler(config) for config in view_photometric_configs(image_size)[:2]]
    params = torch.stack([samplers[v].sample() for v in (0, 1) for _ in range(batch_size)])
    return views, params


def _ours(views: Any, params: Any, device: Any, image_size: int) -> Callable[[], Any]:
    from data.batched_photometric import apply_photometric, blur_radius

    radius = blur_radius(2.0 * image_size / 224)
    return lambda: apply_photometric(views, params, radius)


def _kornia(views: Any, params: Any, device: Any, image_size: int) -> Callable[[], Any]:
    import kornia.augmentation as K
    import torch

    from data.transforms import IMAGENET_MEAN, IMAGENET_STD

    radius = max(1, int(3 * 2.0 * image_size / 224 + 0.999))
    common = [K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), K.RandomGrayscale(p=0.2)]
    pipelines = [
        torch.nn.Sequential(*common, K.RandomGaussianBlur(2 * radius + 1, (0.1, 2.0), p=1.0)),
        torch.nn.Sequential(
            *common,
            K.RandomGaussianBlur(2 * radius + 1, (0.1, 2.0), p=0.1),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2),
        ),
    ]
    normalize = K.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    half = views.shape[0] // 2

    def call() -> Any:
        x = views.float() / 255
        return normalize(torch.cat([pipelines[0](x[:half]), pipelines[1](x[half:])]))

    return call


def _torchvision_v2(views: Any, params: Any, device: Any, image_size: int) -> Callable[[], Any]:
    import torch
    import torchvision.transforms.v2.functional as TF

    from data import batched_photometric as bp
    from data.transforms import IMAGENET_MEAN, IMAGENET_STD

    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    radius = bp.blur_radius(2.0 * image_size / 224)
    rows = params.tolist()

    def call() -> Any:
        out = []
        for image, row in zip(views, rows, strict=True):
            x = TF.to_dtype(image, torch.float32, scale=True)
            if row[bp.JITTER]:
                for op_index in row[bp.ORDER]:
                    x = ops[int(op_index)](x, row[bp.BRIGHTNESS + int(op_index)])
            if row[bp.GRAYSCALE]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if row[bp.BLUR]:
                x = TF.gaussian_blur(x, [2 * radius + 1] * 2, [row[bp.SIGMA]] * 2)
            if row[bp.SOLARIZE]:
                x = TF.solarize(x, 0.5)
            out.append(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
        return torch.stack(out)

    return call


def _pil_per_image(views: Any, params: Any, device: Any, image_size: int) -> Callable[[], Any]:
    import torch
    import torchvision.transforms.functional as F

    from data.augmentations import photometric_pipeline
    from data.transforms import normalize

    pipelines = [photometric_pipeline(1.0, 0.0), photometric_pipeline(0.1, 0.2)]
    images = [F.to_pil_image(view) for view in views.cpu()]
    to_tensor = normalize()
    half = len(images) // 2
    return lambda: torch.stack(
        [to_tensor(pipelines[int(i >= half)](image)) for i, image in enumerate(images)]
    )


BUILDERS = {
    "ours": _ours,
    "kornia": _kornia,
    "torchvision_v2": _torchvision_v2,
    "pil_per_image": _pil_per_image,
}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    load_start = load_average()
    views, params = _views_and_params(cfg["batch_size"], cfg["image_size"])
    views = views.to(device)
    try:
        call = BUILDERS[cfg["implementation"]](views, params, device, cfg["image_size"])
    except ImportError as error:
        return {"config": cfg, "skipped": f"not installed: {error}"}
    seconds, cpu_seconds = [], []
    for repeat in range(cfg["repeats"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:  # the first call is a warm-up
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    return {
        "config": cfg,
        "seconds_per_batch": median(seconds),
        "seconds": seconds,
        # CPU time of all threads: the work done, which other processes on the machine do not move.
        "cpu_seconds_per_batch": median(cpu_seconds),
        "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per batch (2 views each).")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls after one warm-up.")
    add_runner_args(parser, NAME, timeout_s=600)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = get_parser().parse_args(argv)
    if options.worker:
        emit_result(worker(json.loads(options.worker)))
        return {}
    results = []
    for implementation in options.implementations:
        if implementation == "pil_per_image" and options.device != "cpu":
            continue
        config = {
            "implementation": implementation,
            **{k: getattr(options, k) for k in ("batch_size", "image_size", "device", "threads", "repeats")},
        }
        results.append(
            run_worker(__file__, config, options.timeout, in_process=worker if options.in_process else None)
        )
    rows = []
    for result in results:
        if "skipped" in result:
            rows.append([result["config"]["implementation"], None, None, None, result["skipped"]])
            continue
        seconds, cpu_seconds = result["seconds_per_batch"], result["cpu_seconds_per_batch"]
        views = 2 * options.batch_size
        rows.append(
            [
                result["config"]["implementation"],
                seconds * 1e3,
                cpu_seconds * 1e3,
                cpu_seconds * 1e3 / views,
                "",
            ]
        )
    loads = [r[k] for r in results if "skipped" not in r for k in ("load_average_start", "load_average_end")]
    title = (
        f"photometric augmentation of {2 * options.batch_size} views of {options.image_size} px on "
        f"{options.device}; load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f}"
    )
    headers = ["implementation", "wall ms / batch", "CPU ms / batch", "CPU ms / view", "note"]
    print(format_table(headers, rows, title=title))
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
