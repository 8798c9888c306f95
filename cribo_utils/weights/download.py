"""Download of released weights into torch's hub cache: once, resumable, verified, atomic.

``fetch(url, file_name)`` gives ``<torch.hub.get_dir()>/checkpoints/<file_name>`` (``$TORCH_HOME/hub/...``,
where ``torch.hub.load_state_dict_from_url`` keeps DINO's and dinov2's files too, so a file already
downloaded by their hub is reused). A file already there is used as it is; otherwise:

1. The bytes go to ``<file_name>.partial``. A partial file left by an interrupted run is resumed with an
   HTTP ``Range`` request; a server that answers with the whole file (200) restarts it, and one that
   cannot continue it (416) has it discarded. A transfer that
   breaks off (fewer bytes than ``Content-Length``) is resumed up to ``MAX_ATTEMPTS`` times, then the
   partial file is kept for the next run and the error says so.
2. The complete file is verified: the size and sha256 the registry states (none of the releases states
   either, see ``checkpoints/released_models.json``), the sha256 prefix of torch.hub's file-name
   convention ``name-<at least 8 hex digits of the sha256>.ext`` when the URL's file name follows it, and
   that it is a torch checkpoint (a zip archive or a pickle), not a web page. A file that fails is
   deleted, and the error names expected and found values.
3. ``os.replace`` moves it into place (atomic), and ``<file_name>.source`` records its URL.

Concurrent processes (``torchrun`` ranks) serialise on ``<file_name>.lock`` (``fcntl.flock``), so the
file is downloaded once. Google Drive share links (``drive.google.com/file/d/<id>/view``) are turned
into download links, and the confirmation page that Drive shows for large files (a form, a
``confirm=`` link or a ``download_warning`` cookie) is followed. Every failure is one line naming the URL
and the cache path where the file can be placed by hand on a machine without internet access.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.cookiejar
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import IO

import torch

from cribo_utils.weights.errors import DownloadError

logger = logging.getLogger(__name__)

#: Hosts whose share links follow Google Drive's confirmation flow.
DRIVE_HOSTS: frozenset[str] = frozenset(
    {"drive.google.com", "docs.google.com", "drive.usercontent.google.com"}
)
MAX_ATTEMPTS = 3
TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_S = 30.0
#: torch.hub's file-name convention: ``name-<sha256 prefix>.ext``; 8 hex digits at least, as torch.hub asks.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")
#: Read of a body that may be a confirmation page instead of a file (Drive's are a few kB).
_PAGE_BYTES = 1 << 20


class _Interrupted(Exception):
    """The transfer broke off after the response started; the partial file can be resumed."""


class _StartOver(_Interrupted):
    """The server cannot continue the partial file (416, or another first byte): it is discarded."""


def hub_checkpoint_dir() -> Path:
    """``<torch.hub.get_dir()>/checkpoints``: where ``torch.hub.load_state_dict_from_url`` caches files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix_in_name(url: str) -> str | None:
    """The sha256 prefix of torch.hub's ``name-<prefix>.ext`` convention in the URL's file name, or None."""
    match = _HASH_IN_NAME.search(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return match.group(1) if match else None


def google_drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive link (``/file/d/<id>/...``, ``/open?id=``, ``/uc?id=``), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in DRIVE_HOSTS:
        return None
    match = re.search(r"/file/d/([^/]+)", parts.path)
    if match:
        return match.group(1)
    ids = urllib.parse.parse_qs(parts.query).get("id")
    return ids[0] if ids else None


def recorded_source(path: Path) -> str | None:
    """The URL recorded next to a cached file by :func:`fetch`, or None (none recorded, or no file)."""
    source = path.with_name(path.name + ".source")
    return source.read_text().strip() if source.is_file() else None


def fetch(
    url: str, file_name: str, size: int | None = None, sha256: str | None = None, what: str | None = None
) -> Path:
    """The cached file of ``url``: downloaded, verified and moved into the hub cache unless already there.

    Args:
        url: http(s) link (a Google Drive share link is followed through its confirmation page).
        file_name: name of the file in :func:`hub_checkpoint_dir`.
        size: expected size in bytes, when the release states one.
        sha256: expected hex sha256, when the release states one.
        what: name of the weights for messages (default: the URL).
    Returns:
        Path of the cached file.
    Raises:
        DownloadError: unreachable server, HTTP error, a transfer that kept breaking off, or a file that
            fails verification; one line naming the URL and the cache path where the file can be placed
            by hand.
    """
    destination = hub_checkpoint_dir() / file_name
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(destination.with_name(file_name + ".lock")):
        if destination.is_file():  # another process finished it while this one waited
            return destination
        _download(url, destination, size, sha256, what or url)
    return destination


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class _Session:
    """One download: the link the user named (for messages), its cache path and the HTTP client state."""

    url: str
    destination: Path
    jar: http.cookiejar.CookieJar = field(default_factory=http.cookiejar.CookieJar)

    def __post_init__(self) -> None:
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def place_by_hand(self) -> str:
        return (
            f"download {self.url} on a machine with internet access and place it at {self.destination} (or "
            "pass the file's local path to --pretrained_weights / weights=)"
        )


def _download(url: str, destination: Path, size: int | None, sha256: str | None, what: str) -> None:
    session = _Session(url, destination)
    partial = destination.with_name(destination.name + ".partial")
    drive_id = google_drive_file_id(url)
    start_url = url
    if drive_id is not None:
        parts = urllib.parse.urlsplit(url)
        start_url = f"{parts.scheme}://{parts.netloc}/uc?export=download&id={urllib.parse.quote(drive_id)}"
    logger.info("downloading %s from %s to %s", what, url, destination)
    started = time.monotonic()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            _transfer(session, start_url, partial, google_drive=drive_id is not None)
            break
        except _Interrupted as error:
            if isinstance(error, _StartOver):
                partial.unlink(missing_ok=True)
            received = partial.stat().st_size if partial.exists() else 0
            if attempt == MAX_ATTEMPTS:
                raise DownloadError(
                    f"the download of {what} from {url} broke off {MAX_ATTEMPTS} times ({error}); "
                    f"{partial} keeps the {received} bytes received and the next run resumes from there; "
                    f"or {session.place_by_hand()}"
                ) from error
            logger.warning("download of %s broke off at %d bytes (%s); resuming", what, received, error)
    _verify(partial, session, size, sha256, what)
    os.replace(partial, destination)
    destination.with_name(destination.name + ".source").write_text(url + "\n")
    megabytes = destination.stat().st_size / 2**20
    logger.info(
        "downloaded %s (%.1f MB in %.0f s) to %s", what, megabytes, time.monotonic() - started, destination
    )


def _open(session: _Session, url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "cribo-weights/1.0", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response: http.client.HTTPResponse = session.opener.open(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
        return response
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file is not a prefix the server can extend
            raise _StartOver(f"the server cannot continue at byte {offset}") from error
        raise DownloadError(
            f"downloading {session.url} failed: HTTP {error.code} {error.reason}; {session.place_by_hand()}"
        ) from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        host = urllib.parse.urlsplit(url).hostname
        raise DownloadError(
            f"cannot download {session.url}: no connection to {host} ({reason}); {session.place_by_hand()}"
        ) from error


def _transfer(session: _Session, url: str, partial: Path, google_drive: bool) -> None:
    """One request: append to (206) or rewrite (200) ``partial``; raise :class:`_Interrupted` if cut short."""
    offset = partial.stat().st_size if partial.exists() else 0
    response = _open(session, url, offset)
    with contextlib.ExitStack() as stack:
        stack.enter_context(response)
        if google_drive and _is_page(response):
            confirmed = _drive_confirmation_url(response, session)
            response = stack.enter_context(_open(session, confirmed, offset))
        if _is_page(response):
            title = _page_title(response.read(_PAGE_BYTES))
            raise DownloadError(
                f"{session.url} answered with a web page ({title!r}), not the file: the link may need a "
                f"login or lead to a landing page; {session.place_by_hand()}"
            )
        if response.status == 206 and _range_start(response) != offset:
            raise _StartOver(f"the server resumed at another byte than {offset}")
        if response.status != 206:
            offset = 0
        total = _expected_total(response)
        with open(partial, "ab" if offset else "wb") as out:
            _copy(response, out, offset, total)
    received = partial.stat().st_size
    if total is not None and received < total:
        raise _Interrupted(f"{received} of {total} bytes")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte of a 206 answer's ``Content-Range``, None if unreadable."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _expected_total(response: http.client.HTTPResponse) -> int | None:
    """Size of the whole file, from ``Content-Range`` (206) or ``Content-Length`` (200); None when the
    server states neither."""
    if response.status == 206:
        match = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _copy(response: http.client.HTTPResponse, out: IO[bytes], offset: int, total: int | None) -> None:
    written, last_report = offset, time.monotonic()
    try:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
            out.write(chunk)
            written += len(chunk)
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                last_report = time.monotonic()
                of_total = f" of {total / 2**20:.0f}" if total else ""
                logger.info("downloaded %.0f%s MB", written / 2**20, of_total)
    except (http.client.IncompleteRead, ConnectionError, TimeoutError) as error:
        raise _Interrupted(f"{type(error).__name__} after {written} bytes") from error


def _is_page(response: http.client.HTTPResponse) -> bool:
    return response.headers.get_content_type() in ("text/html", "application/xhtml+xml")


class _ConfirmationPage(HTMLParser):
    """Collects what Drive's "can't scan this file for viruses" page offers: a form and ``confirm=`` links."""

    def __init__(self) -> None:
        super().__init__()
        self.form_action: str | None = None
        self.form_fields: list[tuple[str, str]] = []
        self.confirm_links: list[str] = []
        self.title = ""
        self._in_form = self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "form" and self.form_action is None:
            self.form_action, self._in_form = values.get("action", ""), True
        elif tag == "input" and self._in_form and values.get("name"):
            self.form_fields.append((values["name"], values.get("value", "")))
        elif tag == "a" and "confirm=" in values.get("href", ""):
            self.confirm_links.append(values["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _page_title(body: bytes) -> str:
    page = _ConfirmationPage()
    page.feed(body.decode("utf-8", "replace"))
    return page.title.strip() or body[:60].decode("utf-8", "replace").strip()


def _drive_confirmation_url(response: http.client.HTTPResponse, session: _Session) -> str:
    """The download URL behind Drive's confirmation page: its form (action + fields), a ``confirm=``
    link, or the ``download_warning`` cookie's token added to the page's URL."""
    page = _ConfirmationPage()
    page.feed(response.read(_PAGE_BYTES).decode("utf-8", "replace"))
    base = response.geturl()
    if page.form_action is not None and any(name == "confirm" for name, _ in page.form_fields):
        action = urllib.parse.urljoin(base, page.form_action)
        return f"{action}?{urllib.parse.urlencode(page.form_fields)}"
    if page.confirm_links:
        return urllib.parse.urljoin(base, page.confirm_links[0])
    for cookie in session.jar:
        if cookie.name.startswith("download_warning") and cookie.value:
            return f"{base}&confirm={urllib.parse.quote(cookie.value)}"
    raise DownloadError(
        f"Google Drive answered {session.url} with a page ({page.title.strip()!r}) that offers no "
        f"download: the file may not be shared publicly, or its download quota is used up; "
        f"{session.place_by_hand()}"
    )


def _verify(partial: Path, session: _Session, size: int | None, sha256: str | None, what: str) -> None:
    """Size, sha256 (stated, or torch.hub's prefix in the file name) and torch-checkpoint bytes; a file that
    fails is deleted."""
    problem = None
    found_size = partial.stat().st_size
    with open(partial, "rb") as handle:
        head = handle.read(64)
    name_prefix = hash_prefix_in_name(session.url)
    if size is not None and found_size != size:
        problem = f"it has {found_size} bytes, the release states {size}"
    elif sha256 is not None or name_prefix is not None:
        digest = sha256_of(partial)
        if sha256 is not None and digest != sha256.lower():
            problem = f"its sha256 is {digest}, the release states {sha256.lower()}"
        elif name_prefix is not None and not digest.startswith(name_prefix):
            problem = f"its sha256 {digest} does not start with {name_prefix}, the prefix in its file name"
    if problem is None and not (head.startswith(b"PK") or head[:1] == b"\x80"):
        problem = f"it is not a torch checkpoint (it starts {head[:24]!r})"
    if problem is not None:
        partial.unlink()
        raise DownloadError(
            f"the file downloaded from {session.url} for {what} failed verification: {problem}; it was "
            f"deleted. Retry; if it fails again the release changed: check it, then "
            f"{session.place_by_hand()}"
        )
