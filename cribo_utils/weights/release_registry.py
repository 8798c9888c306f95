"""The registry of released backbones (``checkpoints/released_models.json``): names, links, architectures.

Every released backbone of the seed systems (CrIBo, CrOC, DINO, iBOT, VICRegL, dinov2) has a name, e.g.
``cribo_vits16_coco`` or ``dinov2_vits14_reg``, that ``--pretrained_weights``, :func:`load_released_model
<cribo_utils.weights.checkpoint_formats.load_released_model>` and the ``torch.hub`` entry points of
``hubconf.py`` accept. An entry records the release's own link (from its README), the file name in
torch's hub cache, the architecture, the layout of the file, its size and sha256 where the release
states them (none does: null), where the link comes from and the command that evaluates it. Released
models that this repository cannot build (iBOT's Swin-T, DINO's XCiT) are listed apart with the reason.

``CRIBO_WEIGHTS_MIRROR=<base URL>`` fetches every registry file from ``<base URL>/<file_name>`` instead of
its release link (a lab mirror, or the loopback server of the tests); the registry itself is never
edited for that.

``python -m cribo_utils.weights.release_registry`` prints the README's table of released models.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

REGISTRY_PATH = Path(__file__).resolve().parents[2] / "checkpoints" / "released_models.json"
#: Environment variable naming a base URL that serves every registry file under its ``file_name``.
MIRROR_ENV = "CRIBO_WEIGHTS_MIRROR"
SYSTEM_LINKS: dict[str, str] = {
    "CrIBo": "https://github.com/tileb1/CrIBo",
    "CrOC": "https://github.com/stegmuel/CrOC",
    "DINO": "https://github.com/facebookresearch/dino",
    "iBOT": "https://github.com/bytedance/ibot",
    "VICRegL": "https://github.com/facebookresearch/VICRegL",
    "dinov2": "https://github.com/facebookresearch/dinov2",
}


@dataclass(frozen=True)
class Release:
    """One released backbone that this repository loads.

    Attributes:
        name: registry name (``cribo_vits16_coco``); also the ``torch.hub`` entry point.
        system: the method that released it (``CrIBo``, ``DINO``, ...).
        model: architecture and pretraining data in words.
        arch: the ``--arch`` it builds; ``patch_size``: its ViT patch size (None for conv nets).
        layout: top-level layout of the file (a key of ``checkpoint_formats.FORMAT_DESCRIPTIONS``).
        url: the release's link; ``file_name``: the file's name in the hub cache.
        size: bytes, None where the release states none; ``sha256``: hex digest, likewise.
        source: where the link is published; ``evaluate``: the command that evaluates it.
    """

    name: str
    system: str
    model: str
    arch: str
    patch_size: int | None
    layout: str
    url: str
    file_name: str
    size: int | None
    sha256: str | None
    source: str
    evaluate: str


@dataclass(frozen=True)
class UnloadableRelease:
    """A released model whose architecture this repository does not build, and why."""

    name: str
    system: str
    model: str
    url: str
    reason: str
    source: str


@functools.cache
def _read_registry(path: Path) -> tuple[dict[str, Release], dict[str, UnloadableRelease]]:
    with open(path) as handle:
        raw = json.load(handle)
    models = {name: Release(name=name, **fields) for name, fields in raw["models"].items()}
    unloadable = {
        name: UnloadableRelease(name=name, **fields) for name, fields in raw["not_loadable"].items()
    }
    return models, unloadable


def released_models() -> dict[str, Release]:
    """Every loadable release, by name, in the registry's order (CrIBo first)."""
    return _read_registry(REGISTRY_PATH)[0]


def unloadable_releases() -> dict[str, UnloadableRelease]:
    """The released models that do not load here, by name."""
    return _read_registry(REGISTRY_PATH)[1]


def find_release(name_or_url: str) -> Release | UnloadableRelease | None:
    """The registry entry with this name or release link, or None."""
    for entries in (released_models(), unloadable_releases()):
        if name_or_url in entries:
            return entries[name_or_url]
        for entry in entries.values():
            if entry.url == name_or_url:
                return entry
    return None


def download_url(release: Release) -> str:
    """Where to fetch ``release`` from: ``$CRIBO_WEIGHTS_MIRROR/<file_name>`` when set, else its link."""
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{release.file_name}" if mirror else release.url


def markdown_table() -> str:
    """The README's table of released models: system, model, name, link, evaluation command or why it
    does not load."""
    lines = [
        "| system | model | name (`--pretrained_weights`, hub) | link | evaluation |",
        "| --- | --- | --- | --- | --- |",
    ]
    for release in released_models().values():
        lines.append(
            f"| [{release.system}]({SYSTEM_LINKS[release.system]}) | {release.model} | `{release.name}` | "
            f"[{release.file_name}]({release.url}) | `{release.evaluate}` |"
        )
    for entry in unloadable_releases().values():
        lines.append(
            f"| [{entry.system}]({SYSTEM_LINKS[entry.system]}) | {entry.model} | `{entry.name}` | "
            f"[link]({entry.url}) | does not load: {entry.reason} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
