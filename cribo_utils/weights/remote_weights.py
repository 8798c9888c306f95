"""What ``--pretrained_weights`` (and ``weights=``) names: a local file, a released model's name, or a URL.

1. An existing local path is used as it is; nothing is ever fetched for it.
2. ``http(s)://...`` is downloaded once into torch's hub cache (:func:`cribo_utils.weights.download.fetch`)
   under the URL's file name; a release link gets its registry entry's file name and verification.
3. A name of ``checkpoints/released_models.json`` (``cribo_vits16_coco``, ``dinov2_vits14_reg``, ...) is
   downloaded from its release link (or ``$CRIBO_WEIGHTS_MIRROR``) the same way; a released model that
   does not load here (iBOT's Swin, DINO's XCiT) is refused with the reason, before any download.
4. Anything else is left as a path; the loader then reports the missing file (with the registry names
   closest to it, for a misspelt name).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import urllib.parse
from pathlib import Path

from cribo_utils.weights.download import fetch, google_drive_file_id, hub_checkpoint_dir, recorded_source
from cribo_utils.weights.errors import CheckpointFormatError
from cribo_utils.weights.release_registry import (
    Release,
    UnloadableRelease,
    download_url,
    find_release,
    released_models,
    unloadable_releases,
)

StrPath = str | os.PathLike[str]
_URL = re.compile(r"^https?://", re.IGNORECASE)


def is_url(spec: StrPath) -> bool:
    """True for an ``http://`` or ``https://`` link."""
    return bool(_URL.match(str(spec)))


def is_remote_reference(spec: StrPath) -> bool:
    """True when ``spec`` is not a local path but a URL or a registry name (fetched, not read in place)."""
    if Path(spec).exists():
        return False
    return is_url(spec) or find_release(str(spec)) is not None


def url_cache_name(url: str) -> str:
    """The hub-cache file name of an ad-hoc URL: its file name, as torch.hub uses; ``google_drive_<id>.pth``
    for a Drive link; another URL's file under the same name gets the name plus the hash of its URL."""
    drive_id = google_drive_file_id(url)
    base = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = f"google_drive_{drive_id}.pth" if drive_id else re.sub(r"[^A-Za-z0-9._-]", "_", base)
    if not name or name.startswith("."):
        name = "download.pth"
    recorded = recorded_source(hub_checkpoint_dir() / name)
    if recorded is None or recorded == url:
        return name
    stem, suffix = os.path.splitext(name)
    return f"{stem}_url{hashlib.sha256(url.encode()).hexdigest()[:12]}{suffix}"


def _refuse(entry: UnloadableRelease) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{entry.name} ({entry.system} {entry.model}) does not load here: it is {entry.reason}; see the "
        "README's table of released models for the ones that do"
    )


def fetch_release(release: Release) -> Path:
    """The cached file of a registry entry (downloaded and verified on first use)."""
    return fetch(download_url(release), release.file_name, release.size, release.sha256, what=release.name)


def local_weights_path(spec: StrPath) -> Path:
    """The local file that ``spec`` stands for (module docstring): fetched once for a URL or a name.

    Raises:
        CheckpointFormatError: a released model that does not load here (the reason is named).
        DownloadError: see :func:`cribo_utils.weights.download.fetch`.
    """
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    entry = find_release(text)
    if isinstance(entry, UnloadableRelease):
        raise _refuse(entry)
    if isinstance(entry, Release):
        return fetch_release(entry)
    if is_url(text):
        return fetch(text, url_cache_name(text))
    return path


def close_release_names(spec: StrPath) -> list[str]:
    """Registry names close to a misspelt ``spec`` (for the missing-file message)."""
    names = [*released_models(), *unloadable_releases()]
    return difflib.get_close_matches(str(spec), names, n=3, cutoff=0.6)


def results_directory(spec: StrPath) -> Path:
    """Where the evaluations write results "next to the checkpoint": the file's directory for a local
    path; ``output/<name>`` for a registry name and ``output/<file stem>`` for a URL (never the cache)."""
    if not is_remote_reference(spec):
        return Path(spec).resolve().parent
    text = str(spec)
    if find_release(text) is not None and not is_url(text):
        return Path("output") / text
    return Path("output") / Path(url_cache_name(text)).stem
