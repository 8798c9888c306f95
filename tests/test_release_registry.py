"""checkpoints/released_models.json, and released weights by name and by URL through every entry point.

The end-to-end tests serve fabricated files in the releases' layouts from a real HTTP server on
127.0.0.1; ``CRIBO_WEIGHTS_MIRROR`` points the registry's downloads at it (the registry is never edited),
and ``TORCH_HOME`` at a temporary hub cache.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cribo_utils.weights import checkpoint_formats as cf
from cribo_utils.weights.download import hash_prefix_in_name
from cribo_utils.weights.release_registry import (
    REGISTRY_PATH,
    SYSTEM_LINKS,
    markdown_table,
    released_models,
    unloadable_releases,
)
from models import EVAL_ARCHS, build_backbone, dense_stride
from tests.http_helpers import Served, closed_port, loopback_server

REPO_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# The registry


def test_every_entry_is_complete_and_consistent() -> None:
    releases = released_models()
    assert len(releases) == 31 and len(unloadable_releases()) == 6
    assert not set(releases) & set(unloadable_releases())
    file_names = [release.file_name for release in releases.values()]
    assert len(set(file_names)) == len(file_names)  # one cache file per release (iBOT's share a name)
    for name, release in releases.items():
        assert re.fullmatch(r"[a-z0-9_]+", name)
        assert release.arch in EVAL_ARCHS and (release.patch_size is None) == (
            not release.arch.startswith("vit")
        )
        assert release.layout in cf.FORMAT_DESCRIPTIONS
        assert release.url.startswith("https://") and release.file_name.endswith(".pth")
        assert release.size is None and release.sha256 is None  # no release states either
        assert hash_prefix_in_name(release.url) is None  # nor follows torch.hub's name-<sha256>.ext
        assert release.source.startswith(SYSTEM_LINKS[release.system].removeprefix("https://github.com/"))


def test_the_registry_keeps_the_release_records_of_the_argument_files() -> None:
    """checkpoints/releases.json (batch and world size of the released runs) is untouched by the registry."""
    import json

    records = json.loads((REGISTRY_PATH.parent / "releases.json").read_text())
    assert set(records) == {"vits16-coco_args.json", "vits16-in_args.json", "vitb16-in_args.json"}


@pytest.mark.parametrize("name", list(released_models()))
def test_every_evaluation_command_parses_and_fits_the_model(name) -> None:
    import eval_dense_nn

    release = released_models()[name]
    argv = shlex.split(release.evaluate)
    assert argv[:2] == ["python", "eval_dense_nn.py"]
    args = eval_dense_nn.get_args_parser().parse_args(argv[2:])
    assert args.pretrained_weights == name and args.protocol == "voc"
    stride = dense_stride(release.arch, release.patch_size or 16)
    assert (args.image_size or 512) % stride == 0


def test_the_readme_table_is_the_registry() -> None:
    readme = (REPO_DIR / "README.md").read_text()
    assert markdown_table() in readme
    hubconf_pointer = re.search(r'"Released models"', (REPO_DIR / "hubconf.py").read_text())
    assert hubconf_pointer and "## Released models" in readme


def test_hub_entry_points_cover_every_registry_name() -> None:
    import hubconf

    for name in released_models():
        assert callable(getattr(hubconf, name)) and getattr(hubconf, name).__name__ == name
    for name in unloadable_releases():
        assert not hasattr(hubconf, name)


def test_a_release_that_does_not_load_is_refused_before_any_download(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with loopback_server() as server:
        monkeypatch.setenv("CRIBO_WEIGHTS_MIRROR", server.base)
        with pytest.raises(cf.CheckpointFormatError) as info:
            cf.build_pretrained_backbone("vit_small", 16, "ibot_swint7")
        assert server.requests == []
    assert "ibot_swint7 (iBOT Swin-T/7" in str(info.value) and "no Swin backbone" in str(info.value)


def test_a_misspelt_name_is_a_missing_file_with_suggestions() -> None:
    with pytest.raises(FileNotFoundError, match="did you mean cribo_vits16_coco"):
        cf.load_checkpoint_file("cribo_vits16_cocoo")


# ---------------------------------------------------------------------------------------------------
# By name and by URL, against the loopback server


def _seeded_vit(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone("vit_small", depth=1, **kwargs).eval()


@pytest.fixture(scope="module")
def released() -> dict[str, tuple[bytes, nn.Module]]:
    """File bytes in the releases' layouts and the networks that wrote them (ViT-S, one block)."""
    import io

    teacher, student = _seeded_vit(1), _seeded_vit(2)
    # dinov2's ViT-S/14 with registers (its layout is the model's): one block, a 4 x 4 positional grid.
    dinov2 = _seeded_vit(3, patch_size=14, img_size=56, num_register_tokens=4, layer_scale_init=0.5)
    dinov2.interpolate_offset, dinov2.interpolate_antialias = 0.0, True
    contents = {
        "vits16-coco.pth": {  # CrIBo's full checkpoint
            "teacher": {
                **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                "head.mlp.0.weight": torch.zeros(8, 384),
            },
            "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            "epoch": 300,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
        },
        "dinov2_vits14_reg4_pretrain.pth": {**dinov2.state_dict(), "mask_token": torch.zeros(1, 384)},
    }
    files = {}
    for (file_name, content), network in zip(contents.items(), (teacher, dinov2), strict=True):
        buffer = io.BytesIO()
        torch.save(content, buffer)
        files[file_name] = (buffer.getvalue(), network)
    return files


@pytest.fixture
def mirror(released, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with loopback_server() as server:
        for file_name, (payload, _) in released.items():
            server.files[f"/{file_name}"] = Served(payload)
        monkeypatch.setenv("CRIBO_WEIGHTS_MIRROR", server.base)
        yield server


def _assert_same_network(model: nn.Module, reference: nn.Module, size: int) -> None:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
        assert torch.equal(model.forward_features(images)[1], reference.forward_features(images)[1])


def _dense_argv(weights: str, output: Path, size: int) -> list[str]:
    argv = [
        "--pretrained_weights",
        weights,
        "--synthetic_image_size",
        str(size),
        "--synthetic_num_train",
        "2",
    ]
    argv += ["--synthetic_num_val", "2", "--batch_size_per_gpu", "2", "--num_workers", "0"]
    return [
        *argv,
        "--augmentation_epochs",
        "1",
        "--num_neighbours",
        "3",
        "--no_progress",
        "--output_json",
        str(output),
    ]


def test_eval_dense_nn_by_name_downloads_once_and_loads_the_served_weights(
    mirror, released, tmp_path
) -> None:
    import eval_dense_nn

    results = eval_dense_nn.main(_dense_argv("cribo_vits16_coco", tmp_path / "dense.json", 64))
    assert results["pretrained_weights"] == "cribo_vits16_coco" and results["arch"] == "vit_small"
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "vits16-coco.pth"
    assert cached.read_bytes() == released["vits16-coco.pth"][0]
    assert len(mirror.requests) == 1  # the architecture look-up and the load share one download
    _assert_same_network(cf.load_released_model("cribo_vits16_coco"), released["vits16-coco.pth"][1], 64)
    eval_dense_nn.main(_dense_argv("cribo_vits16_coco", tmp_path / "again.json", 64))
    assert len(mirror.requests) == 1


def test_eval_dense_nn_by_url(mirror, released, tmp_path) -> None:
    import eval_dense_nn

    url = mirror.url("/dinov2_vits14_reg4_pretrain.pth")
    results = eval_dense_nn.main(_dense_argv(url, tmp_path / "dense.json", 56))
    assert results["pretrained_weights"] == url and results["patch_size"] == 14
    assert results["patches_per_image"] == 16  # registers are not patches
    _assert_same_network(
        cf.build_pretrained_backbone("vit_small", 14, url), released[url.rsplit("/", 1)[1]][1], 56
    )


def test_torch_hub_load_pretrained_downloads_from_the_registry(mirror, released) -> None:
    model = torch.hub.load(str(REPO_DIR), "dinov2_vits14_reg", source="local", pretrained=True)
    _assert_same_network(model, released["dinov2_vits14_reg4_pretrain.pth"][1], 56)
    assert model.num_register_tokens == 4 and not model.training
    assert [request[0] for request in mirror.requests] == ["/dinov2_vits14_reg4_pretrain.pth"]
    student = torch.hub.load(str(REPO_DIR), "cribo_vits16_coco", source="local", checkpoint_key="student")
    assert student.embed_dim == 384 and len(mirror.requests) == 2


def test_hub_load_with_a_local_file_fetches_nothing(mirror, released, tmp_path) -> None:
    local = tmp_path / "vits16-coco.pth"
    local.write_bytes(released["vits16-coco.pth"][0])
    model = torch.hub.load(str(REPO_DIR), "cribo_vits16_coco", source="local", weights=str(local))
    _assert_same_network(model, released["vits16-coco.pth"][1], 64)
    assert mirror.requests == []


def test_start_checkpoint_by_url_seeds_training(mirror, tmp_path) -> None:
    """main_cribo.py's --start_checkpoint_path takes a URL (or a name) like --pretrained_weights."""
    from cribo_utils.train.checkpoint import without_prefix
    from tests.test_train import run

    run(tmp_path / "source", "--max_iters", "1")
    ours = torch.load(tmp_path / "source" / "checkpoint.pth", weights_only=True)
    released = {
        "student": ours["student"],
        "teacher": ours["teacher"],
        "epoch": 1,
        "dino_loss": ours["dino_loss"],
    }
    released["args"] = argparse.Namespace(arch="vit_tiny")
    torch.save(released, tmp_path / "released.pth")
    mirror.files["/tiny/released.pth"] = Served((tmp_path / "released.pth").read_bytes())
    target = tmp_path / "target"
    run(target, "--max_iters", "1", "--start_checkpoint_path", mirror.url("/tiny/released.pth"), "--lr", "0")
    seeded = torch.load(target / "checkpoint.pth", weights_only=True)
    for name, value in without_prefix(ours["student"], "module.").items():
        torch.testing.assert_close(without_prefix(seeded["student"], "module.")[name], value)


def test_a_start_checkpoint_that_cannot_be_downloaded_is_a_training_error(tmp_path, monkeypatch) -> None:
    from cribo_utils.train import TRAINING_ERRORS
    from cribo_utils.weights.errors import DownloadError
    from tests.test_train import run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = f"http://127.0.0.1:{closed_port()}/released.pth"
    with pytest.raises(DownloadError, match="cannot download") as info:
        run(tmp_path / "target", "--max_iters", "1", "--start_checkpoint_path", url)
    assert isinstance(info.value, TRAINING_ERRORS)  # main_cribo.py prints it as one line, status 1


def test_an_offline_machine_gets_one_line_from_the_cli(tmp_path) -> None:
    port = closed_port()
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "CRIBO_WEIGHTS_MIRROR": f"http://127.0.0.1:{port}"}
    completed = subprocess.run(
        [sys.executable, "eval_knn.py", "--pretrained_weights", "cribo_vits16_coco", "--num_workers", "0"],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]
    url = f"http://127.0.0.1:{port}/vits16-coco.pth"
    assert last_line.startswith(f"eval_knn.py: error: cannot download {url}: no connection to 127.0.0.1")
    assert f"place it at {tmp_path / 'hub' / 'checkpoints' / 'vits16-coco.pth'}" in last_line
