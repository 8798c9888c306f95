"""Which dataset a folder holds, judged from its layout, and the dataset an evaluation runs on.

The evaluations take the dataset from ``--data_path`` as ``main_cribo.py`` does: the built-in synthetic
scenes only when no path is given, otherwise what the folder holds (:func:`detect_layout`). A
``--dataset_type`` that contradicts the folder, or a folder of no known layout, stops the run with one line
naming what was found and what is expected (:func:`resolve_dataset`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from data.datasets import ADE20K_LAYOUT, IMAGEFOLDER_LAYOUT, VOC_LAYOUT, DatasetLayoutError, _is_image_file

#: What each layout is, for messages.
LAYOUT_DESCRIPTIONS: dict[str, str] = {
    "synthetic": "the built-in synthetic scenes (no --data_path)",
    "imagenet1k": "ImageNet-1k (`train/` or `ILSVRC2012_img_train/` of WordNet-id class folders)",
    "imagefolder": "labelled class folders (`<root>/{train,val}/<class>/` or `<root>/<class>/`)",
    "voc": "Pascal VOC 2012 segmentation",
    "ade20k": "ADE20K SceneParsing (ADEChallengeData2016)",
    "coco": "unlabelled images (a COCO-style image folder)",
}
#: Layouts read by the same reader: naming one of them for a folder of the other is no contradiction.
_FAMILIES = {"imagenet1k": "classes", "imagefolder": "classes"}
_WORDNET_ID = re.compile(r"n\d{8}")
_SHOWN_ENTRIES = 6
_COCO_FOLDERS = ("train2017", "images/train2017")


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


def _ade20k_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    return None


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _classification_layout(root: Path) -> str | None:
    """``imagenet1k`` / ``imagefolder`` for split or class-folder trees, None otherwise."""
    if (root / "ILSVRC2012_img_train").is_dir() or (root / "ILSVRC2012_img_val").is_dir():
        return "imagenet1k"
    for split in ("train", "val"):
        if (root / split).is_dir():
            classes = _subfolders(root / split)
            if not classes:
                return None
            wordnet = all(_WORDNET_ID.fullmatch(p.name) for p in classes[:_SHOWN_ENTRIES])
            return "imagenet1k" if wordnet else "imagefolder"
    classes = _subfolders(root)
    if classes and any(_is_image_file(p.name) for c in classes[:_SHOWN_ENTRIES] for p in c.iterdir()):
        return "imagefolder"
    return None


def _entries(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:_SHOWN_ENTRIES]) + (
        f", ... ({len(names)} entries)" if len(names) > _SHOWN_ENTRIES else ""
    )
    return shown or "nothing"


def detect_layout(data_path: str | Path) -> str:
    """The dataset a folder holds: ``voc``, ``ade20k``, ``imagenet1k``, ``imagefolder`` or ``coco``.

    ``voc``: the folder, its ``VOC2012/`` or its ``VOCdevkit/VOC2012/`` holds ``JPEGImages/`` and
    ``ImageSets/Segmentation/``; ``ade20k``: the folder or its ``ADEChallengeData2016/`` holds ``images/``
    and ``annotations/``; ``coco``: ``train2017/`` or ``images/train2017/`` (COCO), or images directly;
    ``imagenet1k``: ``ILSVRC2012_img_{train,val}/``, or ``train/`` / ``val/`` whose class folders are
    WordNet ids; ``imagefolder``: other ``train/`` / ``val/`` class trees, or class folders directly.

    Raises:
        DatasetLayoutError: the folder does not exist, or holds none of these (the message lists what it
            holds and what is expected).
    """
    root = Path(data_path)
    if not root.is_dir():
        raise DatasetLayoutError(f"--data_path {root}: no such folder")
    if _voc_root(root) is not None:
        return "voc"
    if _ade20k_root(root) is not None:
        return "ade20k"
    if any((root / folder).is_dir() for folder in _COCO_FOLDERS):
        return "coco"
    layout = _classification_layout(root)
    if layout is not None:
        return layout
    if any(_is_image_file(p.name) for p in root.iterdir()):
        return "coco"
    raise DatasetLayoutError(
        f"--data_path {root}: unrecognised layout (it holds {_entries(root)}); expected ImageNet or class "
        f"folders ({IMAGEFOLDER_LAYOUT.format(split='train')}), Pascal VOC ({VOC_LAYOUT}) or ADE20K "
        f"({ADE20K_LAYOUT})"
    )


def _family(name: str) -> str:
    return _FAMILIES.get(name, name)


def resolve_dataset(
    requested: str | None, data_path: str | None, accepted: Sequence[str], script: str
) -> str:
    """The dataset to evaluate: the synthetic scenes without a path, else what the folder holds.

    Args:
        requested: ``--dataset_type`` (None: not given).
        data_path: ``--data_path`` (None or "": not given).
        accepted: the datasets this evaluation reads (e.g. ``("synthetic", "imagenet1k", "imagefolder")``).
        script: the launcher's name, for messages.
    Returns:
        The dataset name, one of ``accepted``.
    Raises:
        DatasetLayoutError: ``requested`` needs a path that is missing, contradicts the folder, or the folder
            holds a dataset this evaluation does not read (one line naming what was found and expected).
    """
    expected = " or ".join(LAYOUT_DESCRIPTIONS[name] for name in accepted if name != "synthetic")
    if not data_path:
        if requested in (None, "synthetic"):
            return "synthetic"
        raise DatasetLayoutError(f"--dataset_type {requested} needs --data_path (the dataset's root folder)")
    found = detect_layout(data_path)
    if requested is not None and _family(requested) != _family(found):
        raise DatasetLayoutError(
            f"--dataset_type {requested} contradicts --data_path {data_path}, which holds "
            f"{LAYOUT_DESCRIPTIONS[found]}; drop --dataset_type (the folder decides) or fix --data_path"
        )
    if found not in accepted:
        raise DatasetLayoutError(
            f"--data_path {data_path} holds {LAYOUT_DESCRIPTIONS[found]}, which {script} does not evaluate; "
            f"expected {expected}"
        )
    return requested if requested is not None else found
