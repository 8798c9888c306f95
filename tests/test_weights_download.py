"""cribo_utils/weights/download.py and remote_weights.py against a real HTTP server on 127.0.0.1.

The served files are real torch checkpoints fabricated here; the hub cache is a temporary ``TORCH_HOME``.
Nothing reaches the internet: the only URLs are the loopback server's and a closed loopback port.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import pytest
import torch

from cribo_utils.weights import download
from cribo_utils.weights.download import fetch, hash_prefix_in_name, hub_checkpoint_dir
from cribo_utils.weights.errors import DownloadError
from cribo_utils.weights.remote_weights import local_weights_path, results_directory, url_cache_name
from tests.http_helpers import Served, closed_port, loopback_server


def _checkpoint_bytes(seed: int = 0, numel: int = 50_000) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.randn(numel, generator=torch.Generator().manual_seed(seed))}, buffer)
    return buffer.getvalue()


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A fresh torch hub cache (TORCH_HOME convention); returns its checkpoints directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def server():
    with loopback_server() as state:
        yield state


def test_url_is_downloaded_once_into_the_hub_cache(hub, server) -> None:
    payload = _checkpoint_bytes()
    server.files["/weights/model.pth"] = Served(payload)
    url = server.url("/weights/model.pth")
    path = local_weights_path(url)
    assert path == hub / "model.pth" == hub_checkpoint_dir() / "model.pth"
    assert path.read_bytes() == payload
    assert (hub / "model.pth.source").read_text().strip() == url
    assert not (hub / "model.pth.partial").exists()
    assert local_weights_path(url) == path and len(server.requests) == 1  # cached: no second request
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["weight"], torch.load(io.BytesIO(payload), weights_only=True)["weight"])


def test_a_local_path_is_never_fetched(hub, server, tmp_path, monkeypatch) -> None:
    """A file named like a registry name, or like a URL's file, is read in place: no request is made."""
    monkeypatch.setenv("CRIBO_WEIGHTS_MIRROR", server.base)
    server.files["/vits16-coco.pth"] = Served(_checkpoint_bytes())
    monkeypatch.chdir(tmp_path)
    Path("cribo_vits16_coco").write_bytes(b"local")
    assert local_weights_path("cribo_vits16_coco") == Path("cribo_vits16_coco")
    local = tmp_path / "model.pth"
    local.write_bytes(b"local")
    assert local_weights_path(local) == local and local_weights_path(str(local)) == local
    assert server.requests == [] and not hub.exists()


def test_a_transfer_cut_short_is_resumed_with_a_range_request(hub, server) -> None:
    payload = _checkpoint_bytes()
    server.files["/model.pth"] = Served(payload, truncate_first=1)
    path = fetch(server.url("/model.pth"), "model.pth")
    assert path.read_bytes() == payload
    (first, _, first_range), (second, _, second_range) = server.requests
    assert first_range is None and second_range == f"bytes={len(payload) // 2}-"


def test_a_transfer_that_keeps_breaking_off_keeps_the_partial_file_for_the_next_run(hub, server) -> None:
    payload = _checkpoint_bytes()
    server.files["/model.pth"] = Served(payload, truncate_first=download.MAX_ATTEMPTS, truncate_to=1000)
    url = server.url("/model.pth")
    with pytest.raises(DownloadError) as info:
        fetch(url, "model.pth")
    message = str(info.value)
    assert "\n" not in message and url in message and "broke off 3 times" in message
    assert f"{hub / 'model.pth.partial'} keeps the 3000 bytes" in message and "resumes" in message
    assert not (hub / "model.pth").exists() and (hub / "model.pth.partial").stat().st_size == 3000
    # The next run resumes from byte 3000 and completes the same file.
    assert fetch(url, "model.pth").read_bytes() == payload
    assert server.requests[-1][2] == "bytes=3000-" and not (hub / "model.pth.partial").exists()


def test_a_server_that_ignores_range_restarts_the_partial_file(hub, server) -> None:
    payload = _checkpoint_bytes()
    server.files["/model.pth"] = Served(payload, ignore_range=True)
    hub.mkdir(parents=True)
    (hub / "model.pth.partial").write_bytes(b"stale bytes of another attempt")
    assert fetch(server.url("/model.pth"), "model.pth").read_bytes() == payload
    assert server.requests[0][2] == "bytes=30-"


def test_a_partial_file_longer_than_the_served_one_starts_over(hub, server) -> None:
    payload = _checkpoint_bytes(numel=10)
    server.files["/model.pth"] = Served(payload)
    hub.mkdir(parents=True)
    (hub / "model.pth.partial").write_bytes(b"x" * (len(payload) + 5))  # the server answers 416
    assert fetch(server.url("/model.pth"), "model.pth").read_bytes() == payload


def test_a_wrong_sha256_is_refused_and_nothing_is_cached(hub, server) -> None:
    payload = _checkpoint_bytes()
    server.files["/model.pth"] = Served(payload)
    stated = "ab" * 32
    with pytest.raises(DownloadError) as info:
        fetch(server.url("/model.pth"), "model.pth", sha256=stated, what="cribo_vits16_coco")
    message = str(info.value)
    assert f"its sha256 is {hashlib.sha256(payload).hexdigest()}, the release states {stated}" in message
    assert "cribo_vits16_coco" in message and "\n" not in message and str(hub / "model.pth") in message
    assert not (hub / "model.pth").exists() and not (hub / "model.pth.partial").exists()
    digest = hashlib.sha256(payload).hexdigest()
    assert (
        fetch(server.url("/model.pth"), "model.pth", size=len(payload), sha256=digest).read_bytes() == payload
    )


def test_a_wrong_size_is_refused(hub, server) -> None:
    payload = _checkpoint_bytes()
    server.files["/model.pth"] = Served(payload)
    with pytest.raises(DownloadError, match=f"it has {len(payload)} bytes, the release states 12"):
        fetch(server.url("/model.pth"), "model.pth", size=12)
    assert not (hub / "model.pth").exists()


def test_torch_hub_hash_prefix_in_the_file_name_is_checked(hub, server) -> None:
    payload = _checkpoint_bytes()
    prefix = hashlib.sha256(payload).hexdigest()[:10]
    server.files[f"/resnet-{prefix}.pth"] = Served(payload)
    server.files["/resnet-0123abcd.pth"] = Served(payload)
    assert hash_prefix_in_name(server.url(f"/resnet-{prefix}.pth")) == prefix
    assert hash_prefix_in_name("https://host/vits16-coco.pth") is None  # "coco" is no hex prefix
    assert hash_prefix_in_name("https://host/model-abc.pth") is None  # fewer than 8 digits
    assert local_weights_path(server.url(f"/resnet-{prefix}.pth")).read_bytes() == payload
    with pytest.raises(DownloadError, match="does not start with 0123abcd, the prefix in its file name"):
        local_weights_path(server.url("/resnet-0123abcd.pth"))


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (
            b"<html><head><title>Sign in</title></head></html>",
            "text/html",
            "answered with a web page \\('Sign in'\\)",
        ),
        (b"hello, not weights", "text/plain", "it is not a torch checkpoint"),
    ],
)
def test_a_page_or_text_instead_of_weights_is_refused(hub, server, body, content_type, expected) -> None:
    server.files["/model.pth"] = Served(body, content_type=content_type)
    with pytest.raises(DownloadError, match=expected):
        fetch(server.url("/model.pth"), "model.pth")
    assert not (hub / "model.pth").exists()


def test_an_http_error_is_one_line_naming_the_url_and_the_cache_path(hub, server) -> None:
    url = server.url("/missing.pth")
    with pytest.raises(DownloadError) as info:
        local_weights_path(url)
    message = str(info.value)
    assert message.startswith(f"downloading {url} failed: HTTP 404") and str(hub / "missing.pth") in message
    assert "\n" not in message


def test_an_offline_machine_gets_one_line_with_the_url_and_where_to_place_the_file(hub) -> None:
    url = f"http://127.0.0.1:{closed_port()}/dinov2_vits14_pretrain.pth"
    with pytest.raises(DownloadError) as info:
        local_weights_path(url)
    message = str(info.value)
    assert message.startswith(f"cannot download {url}: no connection to 127.0.0.1")
    assert f"place it at {hub / 'dinov2_vits14_pretrain.pth'}" in message and "\n" not in message
    # The file placed there by hand is then used without any connection.
    hub.mkdir(parents=True, exist_ok=True)
    (hub / "dinov2_vits14_pretrain.pth").write_bytes(_checkpoint_bytes())
    assert local_weights_path(url) == hub / "dinov2_vits14_pretrain.pth"


@pytest.mark.parametrize("kind", ["form", "link", "cookie"])
def test_google_drive_share_links_follow_the_confirmation_page(hub, server, monkeypatch, kind) -> None:
    """Drive answers large files with a "can't scan for viruses" page: its form, link or cookie leads on."""
    monkeypatch.setattr(download, "DRIVE_HOSTS", frozenset({"127.0.0.1"}))
    payload = _checkpoint_bytes(seed=3)
    server.drive["1AbC-d_E"] = (kind, payload)
    path = local_weights_path(server.url("/file/d/1AbC-d_E/view?usp=sharing"))
    assert path == hub / "google_drive_1AbC-d_E.pth" and path.read_bytes() == payload
    assert server.requests[0][:2] == ("/uc", {"export": ["download"], "id": ["1AbC-d_E"]})


def test_google_drive_page_without_a_download_is_one_line(hub, server, monkeypatch) -> None:
    monkeypatch.setattr(download, "DRIVE_HOSTS", frozenset({"127.0.0.1"}))
    server.drive["QuotaId"] = ("quota", b"")
    url = server.url("/file/d/QuotaId/view")
    with pytest.raises(DownloadError) as info:
        local_weights_path(url)
    message = str(info.value)
    assert "'Google Drive - Quota exceeded'" in message and "download quota" in message and url in message
    assert str(hub / "google_drive_QuotaId.pth") in message


def test_google_drive_links_are_recognised_only_on_drive_hosts() -> None:
    assert (
        download.google_drive_file_id("https://drive.google.com/file/d/1di_xSq/view?usp=sharing") == "1di_xSq"
    )
    assert download.google_drive_file_id("https://drive.google.com/uc?export=download&id=XyZ") == "XyZ"
    assert download.google_drive_file_id("https://example.org/file/d/1di_xSq/view") is None


def test_two_urls_with_the_same_file_name_get_their_own_cache_files(hub, server) -> None:
    """iBOT publishes every backbone as checkpoint_teacher.pth: one must not stand for another."""
    first, second = _checkpoint_bytes(seed=1), _checkpoint_bytes(seed=2)
    server.files["/vits_16/checkpoint_teacher.pth"] = Served(first)
    server.files["/vitb_16/checkpoint_teacher.pth"] = Served(second)
    path_first = local_weights_path(server.url("/vits_16/checkpoint_teacher.pth"))
    path_second = local_weights_path(server.url("/vitb_16/checkpoint_teacher.pth"))
    assert path_first == hub / "checkpoint_teacher.pth" and path_second != path_first
    assert path_first.read_bytes() == first and path_second.read_bytes() == second
    assert local_weights_path(server.url("/vitb_16/checkpoint_teacher.pth")) == path_second
    assert url_cache_name(server.url("/vits_16/checkpoint_teacher.pth")) == "checkpoint_teacher.pth"


def test_concurrent_processes_download_once(hub, server) -> None:
    """torchrun ranks resolving the same name at once: one transfer, the others wait for it (a file lock)."""
    payload = _checkpoint_bytes()
    server.files["/model.pth"] = Served(payload, delay_s=0.3)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch(server.url("/model.pth"), "model.pth")))]
    threads.append(
        threading.Thread(target=lambda: results.append(fetch(server.url("/model.pth"), "model.pth")))
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [hub / "model.pth"] * 2 and len(server.requests) == 1
    assert (hub / "model.pth").read_bytes() == payload


def test_results_go_next_to_a_local_file_and_to_output_for_a_name_or_url(tmp_path, server, hub) -> None:
    local = tmp_path / "run" / "checkpoint.pth"
    local.parent.mkdir()
    local.write_bytes(b"x")
    assert results_directory(local) == local.parent
    assert results_directory("cribo_vits16_coco") == Path("output") / "cribo_vits16_coco"
    assert results_directory(server.url("/dir/dino_deitsmall16_pretrain.pth")) == Path(
        "output/dino_deitsmall16_pretrain"
    )
