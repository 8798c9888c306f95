"""Pretrained-backbone loading for every checkpoint layout the evaluations accept.

Supported layouts (detected from the top-level keys, see :func:`detect_checkpoint_format`):

| format         | top level                                     | network keys                           |
| -------------- | --------------------------------------------- | -------------------------------------- |
| ``repo``       | ``student``, ``teacher``, ``format_version``  | as ``full``; ``args`` is a plain dict  |
| ``full``       | ``student``, ``teacher`` (``args`` Namespace) | ``[module.]backbone.*`` and ``head.*`` |
| ``state_dict`` | ``state_dict`` (iBOT backbone-only release)   | ``[module.][backbone.]*``              |
| ``bare``       | the state dict itself (DINO backbone-only,    | ``cls_token``, ``blocks.0...``         |
|                | our ``teacher_backbone.pth``)                 |                                        |

``full`` covers the released CrIBo files (``vits16-coco.pth``, ``vits16-in.pth``, ``vitb16-in.pth``),
DINO/iBOT/CrOC full training checkpoints and our own training checkpoints, whose teacher keys are
``backbone.*`` while the DDP-wrapped student's are ``module.backbone.*`` (method doc Sec. 10 and
defect 19). Prefixes are therefore stripped per key and only as *leading* prefixes, never with a
``str.replace`` anywhere in the name. Projection-head entries (``head.*``) and iBOT's training-only
mask token (``masked_embed``) are dropped; every other key must match the model exactly: loading is
``strict=True`` and a mismatch raises an error that lists the missing, unexpected and mis-shaped keys
(the reference helper loads with ``strict=False``, so a wrong layout silently loads nothing; defect 15).

Files are read with ``torch.load(weights_only=True)``; ``argparse.Namespace`` (the ``args`` entry of
the released files) is the only class allow-listed on top of torch's defaults.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

#: Released CrIBo models: hub entry point name -> (arch, patch_size, file name of the release).
RELEASED_MODELS: dict[str, tuple[str, int, str]] = {
    "cribo_vits16_coco": ("vit_small", 16, "vits16-coco.pth"),
    "cribo_vits16_in": ("vit_small", 16, "vits16-in.pth"),
    "cribo_vitb16_in": ("vit_base", 16, "vitb16-in.pth"),
}

#: Leading prefixes removed from every key (DDP wrapper and student/teacher wrapper).
STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "backbone.")
#: Keys (after prefix stripping) that belong to the projection head, not to the backbone.
DROPPED_PREFIXES: tuple[str, ...] = ("head.",)
#: Backbone parameters that exist only during pretraining (iBOT's student mask token).
TRAINING_ONLY_KEYS: frozenset[str] = frozenset({"masked_embed"})

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "repo": "this repository's training checkpoint (student/teacher, format_version)",
    "full": "full student/teacher checkpoint (released CrIBo, DINO, iBOT or CrOC layout)",
    "state_dict": "backbone-only checkpoint under 'state_dict' (iBOT release layout)",
    "bare": "bare backbone state dict (DINO backbone-only release layout)",
}

_MAX_LISTED_KEYS = 20


class CheckpointFormatError(ValueError):
    """A checkpoint file cannot be read, or its content does not fit the requested backbone."""


def load_checkpoint_file(path: StrPath) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, allow-listing ``argparse.Namespace`` only.

    Args:
        path: a ``.pth`` file written by ``torch.save``: a dict (full checkpoint) or a bare state dict.
    Returns:
        The loaded top-level dict, tensors on the CPU.
    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        CheckpointFormatError: the file is corrupt or truncated, contains a class other than the
            allowed ones, or its top level is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint file {str(path)!r} does not exist (or is not a file); "
            "pass the path of a .pth file, e.g. --pretrained_weights /path/to/vits16-in.pth"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            f"refused to load checkpoint {str(path)!r}: it is not a torch checkpoint, or it holds an "
            "object that is neither a tensor, a number, a string, a container nor argparse.Namespace "
            "(only those load with weights_only=True). Re-save the tensors you need as a plain state "
            f"dict. torch said: {error}"
        ) from error
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError) as error:
        raise CheckpointFormatError(
            f"could not read checkpoint {str(path)!r}: the file looks corrupt or truncated "
            f"(re-download or re-copy it). torch said: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, expected a dict "
            "(a full checkpoint or a state dict)"
        )
    return dict(checkpoint)


def _is_state_dict(candidate: object) -> bool:
    """True for a non-empty mapping from string keys to tensors."""
    return (
        isinstance(candidate, Mapping)
        and len(candidate) > 0
        and all(isinstance(key, str) and isinstance(value, Tensor) for key, value in candidate.items())
    )


def detect_checkpoint_format(checkpoint: Mapping[str, Any]) -> str:
    """Name the layout of a loaded checkpoint: one of ``FORMAT_DESCRIPTIONS``' keys.

    Args:
        checkpoint: the dict returned by :func:`load_checkpoint_file`.
    Returns:
        ``"bare"`` (all values are tensors), ``"repo"`` (has ``format_version``), ``"full"`` (has
        ``student`` or ``teacher``) or ``"state_dict"`` (has ``state_dict``).
    Raises:
        CheckpointFormatError: none of the above; the message lists the top-level keys.
    """
    if _is_state_dict(checkpoint):
        return "bare"
    if "format_version" in checkpoint and ("student" in checkpoint or "teacher" in checkpoint):
        return "repo"
    if "student" in checkpoint or "teacher" in checkpoint:
        return "full"
    if "state_dict" in checkpoint:
        return "state_dict"
    raise CheckpointFormatError(
        "unrecognised checkpoint layout: expected top-level 'teacher'/'student' (CrIBo, DINO, iBOT, CrOC "
        "full checkpoints), 'state_dict' (iBOT backbone-only) or a bare state dict of tensors; found "
        f"top-level keys {sorted(map(str, checkpoint))[:_MAX_LISTED_KEYS]}"
    )


def _select_network(checkpoint: Mapping[str, Any], checkpoint_key: str) -> tuple[Mapping[str, Tensor], str]:
    """Pick the network state dict out of a checkpoint; returns it and a description of where from."""
    checkpoint_format = detect_checkpoint_format(checkpoint)
    description = FORMAT_DESCRIPTIONS[checkpoint_format]
    if checkpoint_format == "bare":
        logger.info("%s: checkpoint_key %r does not apply, using the whole file", description, checkpoint_key)
        return checkpoint, description
    if checkpoint_key in checkpoint:
        network, where = checkpoint[checkpoint_key], f"{description}, key {checkpoint_key!r}"
    elif checkpoint_format == "state_dict":
        logger.info("%s: no %r entry, using 'state_dict'", description, checkpoint_key)
        network, where = checkpoint["state_dict"], f"{description}, key 'state_dict'"
    else:
        # Suggest the entries that hold a ViT (a cls_token under some prefix), not e.g. the loss centres.
        networks = sorted(
            key
            for key, value in checkpoint.items()
            if _is_state_dict(value) and any(name.endswith("cls_token") for name in value)
        )
        raise CheckpointFormatError(
            f"{description}: no entry {checkpoint_key!r}; set --checkpoint_key to one of {networks}"
        )
    if not _is_state_dict(network):
        raise CheckpointFormatError(
            f"{where}: expected a state dict (str -> tensor), found {type(network).__name__}"
        )
    return network, where


def strip_backbone_prefixes(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove leading wrapper prefixes per key and drop head / training-only entries.

    ``module.`` and ``backbone.`` are removed repeatedly while the key *starts* with one of them, so
    ``module.backbone.blocks.0.norm1.weight`` and ``backbone.blocks.0.norm1.weight`` both become
    ``blocks.0.norm1.weight``, while an inner ``...attn.backbone.x`` is left alone (defect 19).

    Args:
        state_dict: one network's state dict, any mix of prefixed and unprefixed keys.
    Returns:
        ``(backbone_state_dict, dropped_keys)``: the stripped backbone entries and the original names
        of the dropped ``head.*`` / ``masked_embed`` entries.
    Raises:
        CheckpointFormatError: two keys map to the same backbone name (e.g. both ``backbone.x`` and ``x``).
    """
    backbone: dict[str, Tensor] = {}
    source_of: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        name = key
        while name.startswith(STRIPPED_PREFIXES):
            prefix = next(prefix for prefix in STRIPPED_PREFIXES if name.startswith(prefix))
            name = name[len(prefix) :]
        if name.startswith(DROPPED_PREFIXES) or name in TRAINING_ONLY_KEYS:
            dropped.append(key)
            continue
        if name in backbone:
            raise CheckpointFormatError(
                f"keys {source_of[name]!r} and {key!r} both map to backbone key {name!r}; "
                "the state dict mixes two networks"
            )
        backbone[name] = value
        source_of[name] = key
    return backbone, dropped


def _extract_with_source(checkpoint: Mapping[str, Any], checkpoint_key: str) -> tuple[dict[str, Tensor], str]:
    """:func:`extract_backbone_state_dict` plus a description of the entry it came from."""
    network, where = _select_network(checkpoint, checkpoint_key)
    backbone, dropped = strip_backbone_prefixes(network)
    if dropped:
        logger.info("%s: dropped %d non-backbone entries (e.g. %s)", where, len(dropped), dropped[0])
    if not backbone:
        raise CheckpointFormatError(f"{where}: no backbone entries left after dropping head keys")
    return backbone, where


def extract_backbone_state_dict(
    checkpoint: Mapping[str, Any], checkpoint_key: str = "teacher"
) -> dict[str, Tensor]:
    """Backbone state dict with DINO ViT key names, from a checkpoint of any supported layout.

    Args:
        checkpoint: the dict returned by :func:`load_checkpoint_file`.
        checkpoint_key: which network of a student/teacher checkpoint to use (``"teacher"`` is what the
            papers evaluate). Ignored for bare state dicts; a ``state_dict``-layout file without this
            key falls back to its ``state_dict`` entry.
    Returns:
        ``{name: tensor}`` with names like ``cls_token``, ``blocks.0.attn.qkv.weight``, ``norm.bias``.
    Raises:
        CheckpointFormatError: unknown layout, missing key, or colliding keys.
    """
    return _extract_with_source(checkpoint, checkpoint_key)[0]


def _format_key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = f", ... and {len(keys) - _MAX_LISTED_KEYS} more" if len(keys) > _MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]"


def load_backbone_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load a stripped backbone state dict with ``strict=True``, explaining any mismatch first.

    Args:
        model: the backbone (e.g. ``models.vision_transformer.VisionTransformer``).
        state_dict: output of :func:`extract_backbone_state_dict`.
        source: the file and detected format, quoted in the error message.
    Raises:
        CheckpointFormatError: missing keys, unexpected keys or shape mismatches (all listed).
    """
    expected = model.state_dict()
    # Listed in the model's / the checkpoint's own key order, so cls_token, pos_embed and patch_embed
    # (the entries that reveal a wrong --arch / --patch_size) come first.
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        hint = "check --arch and --patch_size against the checkpoint"
        if len(missing) == len(expected):
            hint = (
                "no key matches: --checkpoint_key may name the wrong network, or this is not a ViT backbone"
            )
        raise CheckpointFormatError(
            f"cannot load backbone weights from {source} into {type(model).__name__} (strict): "
            f"{len(missing)} missing keys {_format_key_list(missing)}; "
            f"{len(unexpected)} unexpected keys {_format_key_list(unexpected)}; "
            f"{len(mismatched)} shape mismatches {_format_key_list(mismatched)}. Hint: {hint}."
        )
    model.load_state_dict(state_dict, strict=True)


def load_backbone(model: nn.Module, path: StrPath, checkpoint_key: str = "teacher") -> None:
    """Load a backbone checkpoint of any supported layout into ``model`` (strict).

    Args:
        model: backbone whose keys follow DINO's ViT (``cls_token``, ``blocks.N...``, ``norm.*``).
        path: checkpoint file.
        checkpoint_key: network to use in student/teacher checkpoints.
    Raises:
        FileNotFoundError, CheckpointFormatError: see :func:`load_checkpoint_file` and
            :func:`load_backbone_state_dict`; messages name the path and the detected format.
    """
    checkpoint = load_checkpoint_file(path)
    state_dict, where = _extract_with_source(checkpoint, checkpoint_key)
    load_backbone_state_dict(model, state_dict, source=f"{str(path)!r} ({where})")
    logger.info("loaded %d backbone tensors from %s (%s)", len(state_dict), path, where)


def _checkpoint_args(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The training arguments stored in a checkpoint (dict or Namespace), or an empty dict."""
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def _check_architecture(checkpoint: Mapping[str, Any], arch: str, patch_size: int, path: StrPath) -> None:
    """Fail early, naming the flag to change, when the checkpoint's recorded arch differs from the request.

    Only values this repository understands are compared (an ``arch`` from ``models.ARCHS``, an integer
    ``patch_size``); other repositories' names are left to the strict key/shape check.
    """
    from models import ARCHS

    args = _checkpoint_args(checkpoint)
    recorded_arch, recorded_patch = args.get("arch"), args.get("patch_size")
    if recorded_arch in ARCHS and recorded_arch != arch:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} was trained with arch={recorded_arch!r} but --arch {arch!r} was "
            f"requested; pass --arch {recorded_arch}"
        )
    if isinstance(recorded_patch, int) and recorded_patch != patch_size:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} was trained with patch_size={recorded_patch} but --patch_size "
            f"{patch_size} was requested; pass --patch_size {recorded_patch}"
        )


def checkpoint_image_size(state_dict: Mapping[str, Tensor], patch_size: int, default: int = 224) -> int:
    """Input size whose patch grid matches the checkpoint's ``pos_embed``.

    ``pos_embed`` is (1, 1 + g^2, D) for a g x g grid, so the image size is ``g * patch_size``; a
    non-square or absent table gives ``default`` (the strict load then reports the mismatch).

    Args:
        state_dict: stripped backbone state dict.
        patch_size: the backbone's patch size.
        default: size used when the grid cannot be read.
    Returns:
        The ``img_size`` to build the ViT with so that the checkpoint loads unchanged.
    """
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None or pos_embed.ndim != 3:
        return default
    num_patches = pos_embed.shape[1] - 1
    grid = math.isqrt(max(num_patches, 0))
    if grid == 0 or grid * grid != num_patches:
        return default
    return grid * patch_size


def checkpoint_depth(state_dict: Mapping[str, Tensor]) -> int | None:
    """Number of transformer blocks in a backbone state dict (``1 + max N`` over ``blocks.N.*``), or None.

    Our synthetic CPU preset trains 6-block ViTs, so the depth is read from the weights rather than
    assumed to be the architecture's 12.
    """
    indices = [
        int(key.split(".")[1])
        for key in state_dict
        if key.startswith("blocks.") and key.split(".")[1].isdigit()
    ]
    return max(indices) + 1 if indices else None


def build_pretrained_backbone(
    arch: str,
    patch_size: int,
    weights: StrPath | None = None,
    checkpoint_key: str = "teacher",
    depth: int | None = None,
    init_seed: int = 0,
) -> nn.Module:
    """Frozen, eval-mode ViT backbone, optionally initialised from a checkpoint of any supported layout.

    The ViT is built with the ``img_size`` of the checkpoint's positional table (224 for the released
    files) and its number of blocks (12 for the released files), so the weights load unchanged; other
    input sizes are handled by the ViT's bicubic ``interpolate_pos_encoding`` at run time.

    Args:
        arch: one of ``models.ARCHS`` (``vit_tiny``, ``vit_small``, ``vit_base``).
        patch_size: ViT patch size.
        weights: checkpoint path; ``None`` evaluates a randomly initialised network (logged as a warning).
        checkpoint_key: network to use in student/teacher checkpoints.
        depth: number of blocks of a randomly initialised network (default: the arch's); checkpoints
            always use their own depth.
        init_seed: seed of the random initialisation (random baselines are reported over several seeds).
    Returns:
        The backbone in eval mode with ``requires_grad=False`` on every parameter.
    """
    from models import build_backbone

    if weights is None:
        logger.warning(
            "RANDOM INITIALISATION: no weights given, evaluating a randomly initialised %s/%d; "
            "pass --pretrained_weights <checkpoint.pth> (or weights=) to evaluate a trained model",
            arch,
            patch_size,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = build_backbone(arch, patch_size=patch_size, depth=depth)
    else:
        checkpoint = load_checkpoint_file(weights)
        _check_architecture(checkpoint, arch, patch_size, weights)
        state_dict, where = _extract_with_source(checkpoint, checkpoint_key)
        model = build_backbone(
            arch,
            patch_size=patch_size,
            img_size=checkpoint_image_size(state_dict, patch_size),
            depth=checkpoint_depth(state_dict),
        )
        load_backbone_state_dict(model, state_dict, source=f"{str(weights)!r} ({where})")
        logger.info("loaded %s/%d backbone from %s (%s)", arch, patch_size, weights, where)
    model.eval()
    model.requires_grad_(False)
    return model


def load_released_model(name: str, weights: StrPath | None, checkpoint_key: str = "teacher") -> nn.Module:
    """One of the released CrIBo backbones, from a local file (there is no download).

    Args:
        name: ``cribo_vits16_coco``, ``cribo_vits16_in`` or ``cribo_vitb16_in``.
        weights: local path of the released file (``vits16-coco.pth``, ``vits16-in.pth``,
            ``vitb16-in.pth`` from the CrIBo README); ``None`` gives random weights (warned).
        checkpoint_key: ``"teacher"`` (default, what the paper evaluates) or ``"student"``.
    Returns:
        Frozen eval-mode backbone, see :func:`build_pretrained_backbone`.
    """
    if name not in RELEASED_MODELS:
        raise ValueError(f"unknown released model {name!r}; choose one of {sorted(RELEASED_MODELS)}")
    arch, patch_size, file_name = RELEASED_MODELS[name]
    if weights is None:
        logger.warning("%s: no weights= path given; download %s yourself and pass its path", name, file_name)
    return build_pretrained_backbone(arch, patch_size, weights=weights, checkpoint_key=checkpoint_key)


def add_backbone_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the backbone flags shared by the evaluation launchers (DINO's names and defaults).

    Args:
        parser: parser to extend in place.
    Returns:
        The same parser.
    """
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--pretrained_weights",
        default=None,
        type=str,
        help="Checkpoint to evaluate (ours, released CrIBo, DINO, iBOT or CrOC layout). Without it a "
        "randomly initialised network is evaluated, with a warning; nothing is ever downloaded.",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help='Network to read from student/teacher checkpoints ("teacher" or "student").',
    )
    group.add_argument(
        "--arch",
        default="vit_small",
        type=str,
        help="vit_tiny, vit_small or vit_base; must match the checkpoint.",
    )
    group.add_argument("--patch_size", default=16, type=int, help="Patch size; must match the checkpoint.")
    group.add_argument(
        "--depth",
        default=None,
        type=int,
        help="Blocks of a randomly initialised network (checkpoints use their own depth).",
    )
    group.add_argument(
        "--init_seed",
        default=0,
        type=int,
        help="Seed of the random initialisation when no weights are given.",
    )
    return parser


def backbone_from_args(args: argparse.Namespace) -> nn.Module:
    """:func:`build_pretrained_backbone` from the flags that :func:`add_backbone_args` defines."""
    return build_pretrained_backbone(
        args.arch,
        args.patch_size,
        args.pretrained_weights or None,
        args.checkpoint_key,
        depth=args.depth,
        init_seed=args.init_seed,
    )
