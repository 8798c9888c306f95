"""Pretrained-backbone loading for every checkpoint layout the evaluations accept.

Supported layouts (detected from the top-level keys, see :func:`detect_checkpoint_format`):

| format         | top level                                     | network keys                           |
| -------------- | --------------------------------------------- | -------------------------------------- |
| ``repo``       | ``student``, ``teacher``, ``format_version``  | as ``full``; ``args`` is a plain dict  |
| ``full``       | ``student``, ``teacher`` (``args`` Namespace) | ``[module.]backbone.*`` and ``head.*`` |
| ``state_dict`` | ``state_dict`` (iBOT backbone-only release)   | ``[module.][backbone.]*``              |
| ``model``      | ``model``, ``optimizer``, ``epoch`` (VICRegL  | ``[module.]backbone.*``, ``projector.*``, |
|                | full checkpoint)                              | ``maps_projector.*``, ``classifier.*`` |
| ``bare``       | the state dict itself (DINO ViT and ResNet-50 | ``cls_token``, ``blocks.0...`` /       |
|                | and VICRegL backbone-only releases, our       | ``conv1.weight``, ``layer1.0...`` /    |
|                | ``teacher_backbone.pth``)                     | ``downsample_layers.0...``             |

``full`` covers the released CrIBo files (``vits16-coco.pth``, ``vits16-in.pth``, ``vitb16-in.pth``),
DINO/iBOT/CrOC full training checkpoints and our own training checkpoints, whose teacher keys are
``backbone.*`` while the DDP-wrapped student's are ``module.backbone.*`` (docs/method.md, Sec. 10 and
docs/differences.md, difference 19). Prefixes are therefore stripped per key and only as *leading* prefixes,
never with a ``str.replace`` anywhere in the name. Projection-head entries (``head.*``; in a ``model`` file
every entry outside ``backbone.*``: VICRegL's expander ``projector``, ``maps_projector`` and online
``classifier``) and iBOT's training-only mask token (``masked_embed``) are dropped; every other key must
match the model exactly: loading is ``strict=True`` and a mismatch raises an error that lists the missing,
unexpected and mis-shaped keys (the reference helper loads with ``strict=False``, so a wrong layout silently
loads nothing; docs/differences.md, difference 15). Before that, the weights' names and shapes are matched
to an architecture (:mod:`cribo_utils.weights.architecture_detection`), so a wrong ``--arch`` or a Swin /
timm-named file is reported in one line naming what the file holds.

Files are read with ``torch.load(weights_only=True)``; ``argparse.Namespace`` (the ``args`` entry of
the released files) is the only class allow-listed on top of torch's defaults. VICRegL's full ResNet
checkpoints pickle a *reference* to their LARS optimiser's ``exclude_bias_and_norm`` filter function;
such references (and only those, see ``INERT_PICKLED_FUNCTIONS``) are resolved to an inert stand-in
that raises if it were ever called, so the tensors load without importing or running any code.
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

from cribo_utils.weights.architecture_detection import DetectedArchitecture, detect_architecture
from cribo_utils.weights.errors import CheckpointFormatError, DownloadError
from cribo_utils.weights.release_registry import released_models
from cribo_utils.weights.remote_weights import (
    close_release_names,
    fetch_release,
    is_remote_reference,
    local_weights_path,
)
from cribo_utils.weights.vit_key_layouts import to_model_key_layout

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

#: Released backbones (``checkpoints/released_models.json``): name -> (arch, patch_size, cache file name).
RELEASED_MODELS: dict[str, tuple[str, int | None, str]] = {
    name: (release.arch, release.patch_size, release.file_name) for name, release in released_models().items()
}
#: Functions that released checkpoints pickle by reference (VICRegL's LARS filters) and that are
#: replaced by an inert stand-in when reading: matched on the last component of the pickled name.
INERT_PICKLED_FUNCTIONS: frozenset[str] = frozenset({"exclude_bias_and_norm"})

#: Leading prefixes removed from every key (DDP wrapper and student/teacher wrapper).
STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "backbone.")
#: Keys (after prefix stripping) that belong to the projection head, not to the backbone.
DROPPED_PREFIXES: tuple[str, ...] = ("head.",)
#: Backbone parameters that exist only during pretraining (iBOT's and dinov2's mask tokens).
TRAINING_ONLY_KEYS: frozenset[str] = frozenset({"masked_embed", "mask_token"})

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "repo": "this repository's training checkpoint (student/teacher, format_version)",
    "full": "full student/teacher checkpoint (released CrIBo, DINO, iBOT or CrOC layout)",
    "state_dict": "backbone-only checkpoint under 'state_dict' (iBOT release layout)",
    "model": "full checkpoint under 'model' (VICRegL layout: backbone + expander, optimizer)",
    "bare": "bare backbone state dict (DINO / VICRegL backbone-only release layout)",
}

_MAX_LISTED_KEYS = 20
#: Key endings that mark an entry as a backbone state dict (ViT, ResNet, ConvNeXt).
_BACKBONE_MARKERS = ("cls_token", "conv1.weight", "downsample_layers.0.0.weight")
#: ``patch_size`` passed for conv nets, which ignore it (their dense stride follows the stage).
_CONV_PATCH_SIZE_PLACEHOLDER = 16
#: What the evaluations build when neither a flag nor a checkpoint says otherwise (DINO's defaults).
DEFAULT_EVAL_ARCH = "vit_small"
DEFAULT_PATCH_SIZE = 16


#: Errors the evaluation launchers report as one line without a traceback (the message names the file).
LOADING_ERRORS: tuple[type[BaseException], ...] = (CheckpointFormatError, DownloadError, FileNotFoundError)


def _file_kind_error(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, judged from its first bytes; None when it may be one.

    ``torch.save`` writes a zip archive (``PK``) since torch 1.6 and a pickle (first byte 0x80) before;
    anything else (a text file, an HTML error page saved instead of a download) would make torch fail
    with an unhelpful ``KeyError``.
    """
    with open(path, "rb") as handle:
        head = handle.read(256)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") or head[0] == 0x80:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(character.isprintable() or character in "\t\r\n" for character in text):
        first_line = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"it is a text file (starting {first_line!r}), not a torch checkpoint"
    return f"it is not a torch checkpoint (neither a zip archive nor a pickle; first bytes {head[:8]!r})"


def _is_zip_archive(path: Path) -> bool:
    """True for the zip format ``torch.save`` writes since torch 1.6 (the one ``mmap=True`` reads)."""
    with open(path, "rb") as handle:
        return handle.read(2) == b"PK"


_READ_ERRORS = (RuntimeError, EOFError, IndexError, KeyError, ValueError, OSError)


def _corrupt_file_error(path: Path, error: BaseException) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"could not read checkpoint {str(path)!r}: the file looks corrupt or truncated "
        f"(re-download or re-copy it). torch said: {type(error).__name__}: {error}"
    )


def _inert_function(name: str) -> Any:
    """Stand-in for a function a checkpoint pickles by reference: never imported; raises if called."""

    def pickled_function_reference(*args: Any, **kwargs: Any) -> None:
        raise CheckpointFormatError(f"{name} was pickled in a checkpoint; this loader never runs it")

    pickled_function_reference.__qualname__ = f"inert<{name}>"
    return pickled_function_reference


def _torch_load_weights_only(path: Path, extra_globals: list[Any], mmap: bool = False) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace, *extra_globals]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _load_with_inert_functions(path: Path, error: pickle.UnpicklingError, mmap: bool = False) -> Any:
    """Retry a refused load when every unsafe global is a known, pickled-by-reference function."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (*_READ_ERRORS, pickle.UnpicklingError) as read_error:
        raise _corrupt_file_error(path, read_error) from read_error
    refused = [name for name in unsafe if name.rsplit(".", 1)[-1] not in INERT_PICKLED_FUNCTIONS]
    if not unsafe or refused:
        names = ", ".join(refused or unsafe) or "(none listed)"
        raise CheckpointFormatError(
            f"refused to load checkpoint {str(path)!r}: it pickles {names}, which is neither a tensor, a "
            "number, a string, a container nor argparse.Namespace; this loader reads checkpoints with "
            "weights_only=True and never imports or runs code from a file. If this is a released model "
            "of a compared system, its layout is not supported yet"
        ) from error
    logger.info(
        "%s pickles %s (an optimiser filter function); read with an inert stand-in, nothing imported",
        path,
        ", ".join(unsafe),
    )
    try:
        return _torch_load_weights_only(path, [(_inert_function(name), name) for name in unsafe], mmap)
    except (*_READ_ERRORS, pickle.UnpicklingError) as read_error:
        raise _corrupt_file_error(path, read_error) from read_error


def load_checkpoint_file(path: StrPath, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, allow-listing ``argparse.Namespace`` only.

    References to the functions of ``INERT_PICKLED_FUNCTIONS`` (VICRegL's full checkpoints) are
    resolved to inert stand-ins; no code from the file is imported or run.

    Args:
        path: a ``.pth`` file written by ``torch.save``: a dict (full checkpoint) or a bare state dict; or
            a released model's name or a URL, downloaded once into torch's hub cache
            (:func:`cribo_utils.weights.remote_weights.local_weights_path`).
        mmap: map the tensors of a zip-format file instead of reading them, for a look at the names,
            shapes and training arguments that costs no read of the weights (ignored for the legacy
            pickle format, which torch cannot map).
    Returns:
        The loaded top-level dict, tensors on the CPU.
    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        DownloadError: a name or URL could not be downloaded or verified.
        CheckpointFormatError: the file is not a torch checkpoint (text, empty), is corrupt or truncated,
            contains a class other than the allowed ones, or its top level is not a dict.
    """
    path = local_weights_path(path)
    if not path.is_file():
        close = close_release_names(path)
        names = f" nor a released model's name (did you mean {', '.join(close)}?)" if close else ""
        raise FileNotFoundError(
            f"checkpoint file {str(path)!r} does not exist (or is not a file){names}; pass the path of a "
            ".pth file, a URL, or a released model's name, e.g. --pretrained_weights cribo_vits16_in"
        )
    kind_error = _file_kind_error(path)
    if kind_error is not None:
        raise CheckpointFormatError(
            f"cannot read checkpoint {str(path)!r}: {kind_error}; pass the .pth file itself "
            "(--pretrained_weights / weights=)"
        )
    mmap = mmap and _is_zip_archive(path)
    try:
        checkpoint = _torch_load_weights_only(path, [], mmap)
    except pickle.UnpicklingError as error:
        checkpoint = _load_with_inert_functions(path, error, mmap)
    except _READ_ERRORS as error:
        raise _corrupt_file_error(path, error) from error
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
        ``student`` or ``teacher``), ``"state_dict"`` (has ``state_dict``) or ``"model"`` (has ``model``).
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
    if "model" in checkpoint:
        return "model"
    raise CheckpointFormatError(
        "unrecognised checkpoint layout: expected top-level 'teacher'/'student' (CrIBo, DINO, iBOT, CrOC "
        "full checkpoints), 'state_dict' (iBOT backbone-only), 'model' (VICRegL full checkpoint) or a "
        f"bare state dict of tensors; found top-level keys {sorted(map(str, checkpoint))[:_MAX_LISTED_KEYS]}"
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
    elif checkpoint_format in ("state_dict", "model"):
        logger.info("%s: no %r entry, using %r", description, checkpoint_key, checkpoint_format)
        network, where = checkpoint[checkpoint_format], f"{description}, key {checkpoint_format!r}"
    else:
        # Suggest the entries that hold a backbone (a ViT's cls_token, a ResNet's conv1, a ConvNeXt's
        # stem under some prefix), not e.g. the loss centres.
        networks = sorted(
            key
            for key, value in checkpoint.items()
            if _is_state_dict(value) and any(name.endswith(_BACKBONE_MARKERS) for name in value)
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
    ``blocks.0.norm1.weight``, while an inner ``...attn.backbone.x`` is left alone
    (docs/differences.md, difference 19).

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


def backbone_entries_only(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Keep only the ``[module.]backbone.*`` entries of a whole-model state dict (VICRegL's ``model``).

    VICRegL saves its whole ``nn.Module`` (DDP-wrapped): ``module.backbone.*`` next to the expander
    ``module.projector.*``, the local expander ``module.maps_projector.*`` and an online linear
    ``module.classifier.*``. A state dict without any ``backbone.`` entry is returned unchanged.

    Returns:
        ``(kept, dropped_keys)``.
    """

    def is_backbone(key: str) -> bool:
        return (key[len("module.") :] if key.startswith("module.") else key).startswith("backbone.")

    if not any(is_backbone(key) for key in state_dict):
        return dict(state_dict), []
    kept = {key: value for key, value in state_dict.items() if is_backbone(key)}
    return kept, [key for key in state_dict if key not in kept]


def _extract_with_source(checkpoint: Mapping[str, Any], checkpoint_key: str) -> tuple[dict[str, Tensor], str]:
    """:func:`extract_backbone_state_dict` plus a description of the entry it came from."""
    network, where = _select_network(checkpoint, checkpoint_key)
    outside_backbone: list[str] = []
    if detect_checkpoint_format(checkpoint) == "model":
        network, outside_backbone = backbone_entries_only(network)
    backbone, dropped = strip_backbone_prefixes(network)
    dropped = outside_backbone + dropped
    if dropped:
        logger.info("%s: dropped %d non-backbone entries (e.g. %s)", where, len(dropped), dropped[0])
    if not backbone:
        raise CheckpointFormatError(f"{where}: no backbone entries left after dropping head keys")
    backbone, conversions = to_model_key_layout(backbone)
    for conversion in conversions:
        logger.info("%s: %s", where, conversion)
    return backbone, where


def extract_backbone_state_dict(
    checkpoint: Mapping[str, Any], checkpoint_key: str = "teacher"
) -> dict[str, Tensor]:
    """Backbone state dict with the model's key names, from a checkpoint of any supported layout.

    Args:
        checkpoint: the dict returned by :func:`load_checkpoint_file`.
        checkpoint_key: which network of a student/teacher checkpoint to use (``"teacher"`` is what the
            papers evaluate). Ignored for bare state dicts; a ``state_dict``-layout file without this
            key falls back to its ``state_dict`` entry.
    Returns:
        ``{name: tensor}`` with names like ``cls_token``, ``blocks.0.attn.qkv.weight``, ``norm.bias``
        (ViT; the layouts of :mod:`cribo_utils.weights.vit_key_layouts` renamed to it),
        ``layer1.0.conv1.weight`` (ResNet-50) or ``stages.0.0.dwconv.weight`` (ConvNeXt).
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
    mismatched_keys = [
        key for key, value in expected.items() if key in state_dict and state_dict[key].shape != value.shape
    ]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in mismatched_keys
    ]
    if missing or unexpected or mismatched:
        hint = "check --arch and --patch_size against the checkpoint"
        embeddings = [key for key in ("cls_token", "pos_embed", "patch_embed.proj.weight") if key in expected]
        if embeddings and all(key in state_dict and key not in mismatched_keys for key in embeddings):
            hint = (
                "--arch and --patch_size fit (the embeddings load); the blocks hold parameters of a ViT "
                "layout this repository does not build"
            )
        if len(missing) == len(expected):
            hint = (
                "no key matches: --checkpoint_key may name the wrong network, or the file holds another "
                f"kind of network than {type(model).__name__}"
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
        model: a backbone of ``models`` (DINO's ViT names, torchvision's ResNet-50, VICRegL's ConvNeXt).
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


def stored_training_args(checkpoint: Mapping[str, Any], weights: StrPath) -> dict[str, Any]:
    """The training arguments behind a checkpoint: its ``args`` entry, else the ``args.json`` a training run
    writes next to its checkpoints (``teacher_backbone.pth`` holds weights only), else {}."""
    import json

    args = _checkpoint_args(checkpoint)
    if args or is_remote_reference(weights):  # a downloaded file has no run directory around it
        return args
    args_json = Path(weights).parent / "args.json"
    if not args_json.is_file():
        return {}
    try:
        with open(args_json) as handle:
            stored = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("ignoring %s: %s", args_json, error)
        return {}
    if not isinstance(stored, dict):
        return {}
    logger.info("training settings read from %s", args_json)
    return stored


def resolve_architecture(
    weights: StrPath | None,
    checkpoint_key: str = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
) -> tuple[str, int]:
    """The ``(arch, patch_size)`` to build: each explicit value, else what the checkpoint records (its
    training arguments, :func:`stored_training_args`), else what its weights' shapes fit
    (:func:`cribo_utils.weights.architecture_detection.detect_architecture`); ``vit_small`` / 16 (DINO's
    defaults) when no weights are given. A contradiction between an explicit value and the weights is reported
    later, by :func:`build_pretrained_backbone`, with the flag to change.

    Raises:
        CheckpointFormatError: the checkpoint neither records an architecture nor has weights of one
            this repository builds (the message names the file and asks for ``--arch``).
    """
    from models import ARCHS, EVAL_ARCHS

    if arch is not None and (patch_size is not None or arch not in ARCHS):
        return arch, patch_size or _CONV_PATCH_SIZE_PLACEHOLDER
    if weights is None:
        return arch or DEFAULT_EVAL_ARCH, patch_size or DEFAULT_PATCH_SIZE
    checkpoint = load_checkpoint_file(weights, mmap=True)  # names, shapes and args: the weights stay on disk
    recorded = stored_training_args(checkpoint, weights)
    detected = detect_architecture(extract_backbone_state_dict(checkpoint, checkpoint_key))
    if arch is None:
        recorded_arch = recorded.get("arch")
        arch = recorded_arch if recorded_arch in EVAL_ARCHS else detected.arch
    if arch is None:
        raise CheckpointFormatError(
            f"cannot tell the architecture of {str(weights)!r}: it records none and its weights "
            f"({detected.description}) fit no architecture of this repository; pass --arch (one of "
            f"{', '.join(EVAL_ARCHS)})"
        )
    if patch_size is None:
        recorded_patch = recorded.get("patch_size")
        patch_size = (
            recorded_patch if isinstance(recorded_patch, int) else detected.patch_size
        ) or DEFAULT_PATCH_SIZE
    return arch, patch_size


def resolve_backbone_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the ``--arch`` / ``--patch_size`` left unset (None) from ``--pretrained_weights``, in place
    (:func:`resolve_architecture`); every evaluation and figure calls this before building anything."""
    given = (args.arch, args.patch_size)
    weights = args.pretrained_weights or None
    args.arch, args.patch_size = resolve_architecture(weights, args.checkpoint_key, *given)
    if weights is not None and given != (args.arch, args.patch_size):
        logger.info("architecture of %s: --arch %s --patch_size %d", weights, args.arch, args.patch_size)
    return args


def _check_architecture(checkpoint: Mapping[str, Any], arch: str, patch_size: int, path: StrPath) -> None:
    """Fail early, naming the flag to change, when the checkpoint's recorded arch differs from the request.

    Only values this repository understands are compared (an ``arch`` from ``models.EVAL_ARCHS``, an
    integer ``patch_size`` for a ViT); other repositories' names are left to the shape check.
    """
    from models import ARCHS, EVAL_ARCHS

    args = _checkpoint_args(checkpoint)
    recorded_arch, recorded_patch = args.get("arch"), args.get("patch_size")
    if recorded_arch in EVAL_ARCHS and recorded_arch != arch:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} was trained with arch={recorded_arch!r} but --arch {arch!r} was "
            f"requested; pass --arch {recorded_arch}"
        )
    if arch in ARCHS and isinstance(recorded_patch, int) and recorded_patch != patch_size:
        raise CheckpointFormatError(
            f"checkpoint {str(path)!r} was trained with patch_size={recorded_patch} but --patch_size "
            f"{patch_size} was requested; pass --patch_size {recorded_patch}"
        )


def check_weights_fit_arch(detected: DetectedArchitecture, arch: str, patch_size: int, source: str) -> None:
    """One-line error when the weights' names and shapes are not those of ``--arch`` (before the strict load).

    Args:
        detected: :func:`cribo_utils.weights.architecture_detection.detect_architecture` of the
            stripped weights.
        arch: the requested ``--arch``.
        patch_size: the requested ``--patch_size`` (compared for ViTs only).
        source: the file and format, quoted in the message.
    Raises:
        CheckpointFormatError: a Swin, a timm-named ConvNeXt, a mean-pooled ViT, another architecture, or
            another ViT patch size; the message names what the file holds and the flags that fit it.
            Unknown layouts pass (the strict load lists their keys).
    """
    from models import ARCHS, EVAL_ARCHS

    holds = f"{source} holds a {detected.description} backbone"
    if detected.family == "swin":
        raise CheckpointFormatError(
            f"{holds}; this repository has no Swin Transformer (iBOT's Swin-T release does not load "
            "here, see the README's list of released models); evaluate a ViT, ResNet-50 or ConvNeXt file"
        )
    if detected.family == "unknown":
        return
    if detected.mean_pooled:
        raise CheckpointFormatError(
            f"{holds}: a mean-pooled ViT (fc_norm.* on the mean of the patch tokens and no final norm, as "
            "timm's global_pool='avg', MAE or BEiT); this repository's ViT evaluates the final-norm [CLS] "
            "and patch tokens, so such a file does not load"
        )
    if detected.arch is None:
        raise CheckpointFormatError(
            f"{holds}; no --arch of this repository has that shape (choose one of {', '.join(EVAL_ARCHS)})"
        )
    if not detected.loadable:
        raise CheckpointFormatError(
            f"{holds}, whose key names are not those of this repository's models (--arch {detected.arch} "
            "expects VICRegL's ConvNeXt names: downsample_layers.*, stages.i.j.dwconv.*)"
        )
    if detected.arch != arch:
        raise CheckpointFormatError(
            f"{holds}, but --arch {arch} was requested; pass {detected.flags()}, the arch its shapes fit"
        )
    if arch in ARCHS and detected.patch_size is not None and detected.patch_size != patch_size:
        raise CheckpointFormatError(
            f"{holds} with patch size {detected.patch_size}, but --patch_size {patch_size} was requested; "
            f"pass --patch_size {detected.patch_size}"
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
    dense_stage: int = 4,
) -> nn.Module:
    """Frozen, eval-mode backbone (ViT or conv net), optionally initialised from a checkpoint.

    A ViT is built with the ``img_size`` of the checkpoint's positional table (224 for DINO's released
    files, 518 for dinov2's), its number of blocks and the LayerScale, registers and MLP its weights have
    (:meth:`DetectedArchitecture.vit_options`), so the weights load unchanged; other input sizes are
    handled by the ViT's bicubic ``interpolate_pos_encoding`` at run time. A ConvNeXt gets layer scale
    exactly when the file has ``gamma`` entries. Before the strict load, the weights' names
    and shapes are matched to an architecture (:func:`check_weights_fit_arch`).

    Args:
        arch: one of ``models.EVAL_ARCHS`` (``vit_tiny`` ... ``vit_large``, ``resnet50``, ``convnext_*``).
        patch_size: ViT patch size (ignored for conv nets, whose dense stride follows ``dense_stage``).
        weights: checkpoint path, released model's name or URL (downloaded once); ``None`` evaluates a
            randomly initialised network (logged as a warning).
        checkpoint_key: network to use in student/teacher checkpoints.
        depth: number of blocks of a randomly initialised ViT (default: the arch's); checkpoints
            always use their own depth.
        init_seed: seed of the random initialisation (random baselines are reported over several seeds).
        dense_stage: conv nets: the stage (1-4) whose map is the dense feature grid (4: stride 32).
    Returns:
        The backbone in eval mode with ``requires_grad=False`` on every parameter.
    """
    from models import ARCHS, EVAL_ARCHS, build_eval_backbone

    if arch not in EVAL_ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of {', '.join(EVAL_ARCHS)}")
    name = f"{arch}/{patch_size}" if arch in ARCHS else arch
    if weights is None:
        logger.warning(
            "RANDOM INITIALISATION: no weights given, evaluating a randomly initialised %s; "
            "pass --pretrained_weights <checkpoint.pth> (or weights=) to evaluate a trained model",
            name,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = build_eval_backbone(arch, patch_size=patch_size, depth=depth, dense_stage=dense_stage)
    else:
        checkpoint = load_checkpoint_file(weights)
        _check_architecture(checkpoint, arch, patch_size, weights)
        state_dict, where = _extract_with_source(checkpoint, checkpoint_key)
        source = f"{str(weights)!r} ({where})"
        detected = detect_architecture(state_dict)
        check_weights_fit_arch(detected, arch, patch_size, source)
        model = build_eval_backbone(
            arch,
            patch_size=patch_size,
            img_size=checkpoint_image_size(state_dict, patch_size),
            depth=checkpoint_depth(state_dict),
            dense_stage=dense_stage,
            layer_scale=detected.layer_scale,
            vit_options=detected.vit_options(),
        )
        load_backbone_state_dict(model, state_dict, source=source)
        logger.info(
            "loaded %s backbone from %s (%s; weights: %s)", name, weights, where, detected.description
        )
    model.eval()
    model.requires_grad_(False)
    return model


def load_released_model(
    name: str, weights: StrPath | None = None, checkpoint_key: str = "teacher", pretrained: bool = True
) -> nn.Module:
    """One of the released backbones of CrIBo and the compared systems (``checkpoints/released_models.json``).

    Args:
        name: a key of ``RELEASED_MODELS`` (``cribo_vits16_in``, ``dino_resnet50``, ``dinov2_vits14_reg``,
            ``vicregl_convnext_small_alpha0p75``, ...).
        weights: a local file (or URL) to load instead of the release's download; nothing is fetched for
            a local file.
        checkpoint_key: ``"teacher"`` (default, what the papers evaluate) or ``"student"`` for
            student/teacher checkpoints; backbone-only and VICRegL files ignore it.
        pretrained: without ``weights``, download the release once into torch's hub cache and load it
            (True, the default), or build a randomly initialised network (False, warned).
    Returns:
        Frozen eval-mode backbone, see :func:`build_pretrained_backbone`.
    Raises:
        ValueError: an unknown name (the message lists the registry's names).
    """
    if name not in RELEASED_MODELS:
        raise ValueError(f"unknown released model {name!r}; choose one of {sorted(RELEASED_MODELS)}")
    release = released_models()[name]
    if weights is None and pretrained:
        weights = fetch_release(release)
    elif weights is None:
        logger.warning("%s: pretrained=False, building %s with random weights", name, release.file_name)
    return build_pretrained_backbone(
        release.arch,
        release.patch_size or _CONV_PATCH_SIZE_PLACEHOLDER,
        weights=weights,
        checkpoint_key=checkpoint_key,
    )


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
        help="Checkpoint to evaluate: a local file (ours, or a CrIBo, CrOC, DINO, iBOT, VICRegL, dinov2 or "
        "timm ViT release; nothing is downloaded for it), a released model's name (e.g. cribo_vits16_coco, "
        "dinov2_vits14_reg; checkpoints/released_models.json) or an http(s) URL, downloaded once into "
        "torch's hub cache and verified. Without it a randomly initialised network is evaluated, with a "
        "warning.",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help='Network to read from student/teacher checkpoints ("teacher" or "student").',
    )
    group.add_argument(
        "--arch",
        default=None,
        type=str,
        help="vit_tiny, vit_small, vit_base, vit_large, vit_giant, resnet50 or "
        "convnext_{tiny,small,base,large,xlarge}. "
        "Default: what the checkpoint records or its weights fit (vit_small without weights); a mismatch "
        "is reported with the arch the weights fit.",
    )
    group.add_argument(
        "--patch_size",
        default=None,
        type=int,
        help="ViT patch size (conv nets: unused). Default: the checkpoint's (16 without weights).",
    )
    group.add_argument(
        "--dense_stage",
        default=4,
        type=int,
        choices=(1, 2, 3, 4),
        help="Conv nets only: the stage whose map is the dense feature grid (dense NN, figures). 4, the "
        "last stage at stride 32, is what the conv releases use; 3 gives stride 16 with the stage's own "
        "(fewer) channels.",
    )
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
    """:func:`build_pretrained_backbone` from the flags that :func:`add_backbone_args` defines (an unset
    ``--arch`` / ``--patch_size`` resolved first, :func:`resolve_backbone_args`)."""
    if args.arch is None or args.patch_size is None:
        resolve_backbone_args(args)
    return build_pretrained_backbone(
        args.arch,
        args.patch_size,
        args.pretrained_weights or None,
        args.checkpoint_key,
        depth=args.depth,
        init_seed=args.init_seed,
        dense_stage=getattr(args, "dense_stage", 4),
    )
