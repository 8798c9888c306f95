"""The pretraining data: the two-view dataset, its resumable sampler and loader, and the photometric
stages that ``--augment_on device`` runs on the batch after the copy."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from cribo_utils.runtime import distributed
from cribo_utils.train.parser import ConfigError
from data.loading import (
    PerSampleSeededDataset,
    ResumableDistributedSampler,
    set_worker_signal_handlers,
)


def build_pretrain_loader(
    args: argparse.Namespace, env: distributed.DistEnv
) -> tuple[torch.utils.data.DataLoader, ResumableDistributedSampler, PerSampleSeededDataset]:
    from data.augmentations import TwoViewTransform
    from data.datasets import build_pretrain_dataset

    transform = TwoViewTransform(
        image_size=args.image_size,
        patch_size=args.patch_size,
        global_crops_scale=tuple(args.global_crops_scale),
        hue=args.hue_jitter,
        grayscale_p=args.grayscale_p,
        blur_radius_max=args.blur_radius_max,
        augment_on=args.augment_on,
        local_crops_number=args.local_crops_number,
        local_crops_scale=tuple(args.local_crops_scale),
        local_crops_size=args.local_crops_size,
    )
    base = build_pretrain_dataset(  # the wrapper below skips unreadable files and counts them per sample
        args.dataset_type,
        args.data_path,
        transform=None,
        synthetic_kwargs={
            "image_size": args.synthetic_image_size,
            "num_train": args.synthetic_num_train,
            "seed": args.seed,
            "object_colours": args.synthetic_object_colours,
            "level": args.synthetic_level,
            "colourings": 2 if args.synthetic_recolour_views else 1,
            "recolour_background": args.synthetic_recolour_background,
            "retexture": args.synthetic_retexture_views,
        },
        skip_bad_files=False,
    )
    dataset = PerSampleSeededDataset(
        base, seed=args.seed, transform=transform, skip_bad_files=args.skip_bad_files
    )
    try:
        sampler = ResumableDistributedSampler(
            len(dataset), args.batch_size_per_gpu, env.world_size, env.rank, seed=args.seed, shuffle=True
        )
    except ValueError as error:
        raise ConfigError(f"--data_path {args.data_path or '(synthetic)'}: {error}") from error
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=False,
        worker_init_fn=set_worker_signal_handlers if args.num_workers > 0 else None,
    )
    return loader, sampler, dataset


def augment_on_device(
    args: argparse.Namespace, images: torch.Tensor, views: Any, first: int = 0, count: int = 2
) -> torch.Tensor:
    """``--augment_on device``: the photometric stages of crops ``first .. first + count - 1``, batched.

    ``images`` holds those crops, crop-major (crop ``first``'s batch, then the next ...), on the training
    device; by default the two global views. ``views`` is the collated ``(crops, positions, params)`` of
    :class:`data.augmentations.TwoViewTransform`; with ``--augment_on workers`` it has no ``params`` and
    ``images`` (already normalised) are returned as is.
    """
    if len(views) < 3:
        return images
    from data.augmentations import blur_kernel_radius
    from data.batched_photometric import apply_photometric

    params = torch.cat(views[2][first : first + count])  # host-side, crop-major like ``images``
    return apply_photometric(images, params, blur_kernel_radius(args.image_size, args.blur_radius_max))
