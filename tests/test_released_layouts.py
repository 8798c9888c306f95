"""The released files of the compared systems, rebuilt in their real layouts with random weights.

Each fixture writes a ``.pth`` with the release's top-level keys and key names (DINO's ResNet-50
backbone-only and full checkpoints, VICRegL's ResNet-50 and ConvNeXt backbone-only files and full
checkpoints, iBOT's ViT-L/16 teacher and full checkpoints, iBOT's Swin-T) and checks that every entry
point (``build_pretrained_backbone`` as the eval scripts call it, ``load_released_model``, hubconf)
gives exactly the network that wrote it. The widths of VICRegL's expanders are shrunk (8192 -> 16) and
the ViT-L has 2 of its 24 blocks, to keep the files small; the key names are the releases'.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cribo_utils.weights import checkpoint_formats as cf
from models import build_eval_backbone
from models.vision_transformer import vit_large

REPO_DIR = str(Path(__file__).resolve().parents[1])
VIT_LARGE_DEPTH = 2


def _seeded(arch: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = vit_large(depth=VIT_LARGE_DEPTH, **kwargs) if arch == "vit_large" else build_eval_backbone(arch)
    if arch == "resnet50":  # non-trivial BN statistics, as a trained network has
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.num_batches_tracked.fill_(1000)
    return model.eval()


def _prefixed(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}


def _mlp(prefix: str, widths: list[int]) -> dict[str, Tensor]:
    """VICRegL's utils.MLP keys: Linear, BatchNorm1d, ReLU per hidden layer, last Linear without bias."""
    state: dict[str, Tensor] = {}
    index = 0
    for first, second in zip(widths[:-2], widths[1:-1], strict=True):
        state[f"{prefix}.{index}.weight"] = torch.randn(second, first)
        state[f"{prefix}.{index}.bias"] = torch.zeros(second)
        for name, value in (
            ("weight", torch.ones(second)),
            ("bias", torch.zeros(second)),
            ("running_mean", torch.zeros(second)),
            ("running_var", torch.ones(second)),
            ("num_batches_tracked", torch.tensor(5)),
        ):
            state[f"{prefix}.{index + 1}.{name}"] = value
        index += 3
    state[f"{prefix}.{index}.weight"] = torch.randn(widths[-1], widths[-2])
    return state


def _vicregl_model_entry(backbone: nn.Module, width: int) -> dict[str, Tensor]:
    """``model.state_dict()`` of VICRegL's DDP-wrapped VICRegL module (backbone, expanders, classifier)."""
    return {
        **_prefixed(backbone.state_dict(), "module.backbone."),
        **_prefixed(_mlp("maps_projector", [width, 16, 16, 16]), "module."),
        **_prefixed(_mlp("projector", [width, 16, 16, 16]), "module."),
        "module.classifier.weight": torch.zeros(10, width),
        "module.classifier.bias": torch.zeros(10),
    }


def _lars_state_dict(num_params: int) -> dict:
    """VICRegL's LARS ``optimizer.state_dict()``: its param group holds the filter *functions*."""
    optimizers = types.ModuleType("optimizers")  # VICRegL's optimizers.py, importable while saving only

    def exclude_bias_and_norm(p: Tensor) -> bool:
        return p.ndim == 1

    exclude_bias_and_norm.__module__ = "optimizers"
    exclude_bias_and_norm.__qualname__ = "exclude_bias_and_norm"
    optimizers.exclude_bias_and_norm = exclude_bias_and_norm
    sys.modules["optimizers"] = optimizers
    group = {
        "lr": 0.3,
        "weight_decay": 1e-6,
        "momentum": 0.9,
        "eta": 1e-3,
        "weight_decay_filter": exclude_bias_and_norm,
        "lars_adaptation_filter": exclude_bias_and_norm,
        "params": list(range(num_params)),
    }
    return {"state": {0: {"mu": torch.zeros(3)}}, "param_groups": [group]}


def _save_without_module(obj: dict, path: Path) -> None:
    """torch.save while the fake ``optimizers`` module exists, then remove it: loading cannot import it."""
    try:
        torch.save(obj, path)
    finally:
        sys.modules.pop("optimizers", None)


def _adamw_state_dict(num_params: int) -> dict:
    """VICRegL's AdamW param groups (no decay / decay / maps group with the ``__MAPS_TOKEN__`` marker)."""
    half = num_params // 2
    return {
        "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
        "param_groups": [
            {"params": list(range(half)), "weight_decay": 0.0, "lr": 1e-3, "betas": (0.9, 0.999)},
            {
                "params": list(range(half, num_params)),
                "weight_decay": 0.05,
                "lr": 1e-3,
                "betas": (0.9, 0.999),
            },
            {"params": [], "weight_decay": 0.05, "__MAPS_TOKEN__": "", "lr": 1e-4, "betas": (0.9, 0.999)},
        ],
    }


@pytest.fixture(scope="module")
def networks() -> dict[str, nn.Module]:
    return {
        "resnet50": _seeded("resnet50", 1),
        "resnet50_student": _seeded("resnet50", 2),
        "convnext_small": _seeded("convnext_small", 3),
        "vit_large": _seeded("vit_large", 4),
        "vit_large_student": _seeded("vit_large", 5),
    }


@pytest.fixture(scope="module")
def release_files(networks, tmp_path_factory) -> dict[str, Path]:
    """name -> file in the release's layout (written once per module)."""
    root = tmp_path_factory.mktemp("releases")
    resnet, convnext, vit = networks["resnet50"], networks["convnext_small"], networks["vit_large"]
    dino_head = {"head.mlp.0.weight": torch.zeros(8, 2048), "head.last_layer.weight_g": torch.ones(8, 1)}
    files: dict[str, object] = {
        # dino_resnet50_pretrain.pth: torchvision resnet50 with fc = Identity, saved bare.
        "dino_resnet50_pretrain.pth": resnet.state_dict(),
        # DINO full checkpoint of a ResNet: batch norms make DINO wrap the teacher in DDP as well.
        "dino_resnet50_full.pth": {
            "student": _prefixed(
                {**_prefixed(networks["resnet50_student"].state_dict(), "backbone."), **dino_head}, "module."
            ),
            "teacher": _prefixed({**_prefixed(resnet.state_dict(), "backbone."), **dino_head}, "module."),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "epoch": 800,
            "args": argparse.Namespace(arch="resnet50", patch_size=16, out_dim=60000),
            "dino_loss": {"center": torch.zeros(1, 8)},
        },
        "resnet50_alpha0.9.pth": resnet.state_dict(),
        "vicregl_resnet50_full.pth": {
            "epoch": 300,
            "model": _vicregl_model_entry(resnet, 2048),
            "optimizer": _lars_state_dict(len(list(resnet.parameters()))),
        },
        "convnext_small_alpha0.75.pth": convnext.state_dict(),
        "vicregl_convnext_small_full.pth": {
            "epoch": 400,
            "model": _vicregl_model_entry(convnext, 768),
            "optimizer": _adamw_state_dict(len(list(convnext.parameters()))),
        },
        # iBOT's backbone-only download (checkpoint_teacher.pth) and its full checkpoint.
        "ibot_vitl16_checkpoint_teacher.pth": {"state_dict": vit.state_dict()},
        "ibot_vitl16_checkpoint.pth": {
            "student": {
                **_prefixed(networks["vit_large_student"].state_dict(), "module.backbone."),
                "module.backbone.masked_embed": torch.zeros(1, 1024),
                "module.head.mlp.0.weight": torch.zeros(8, 1024),
            },
            "teacher": {
                **_prefixed(vit.state_dict(), "backbone."),
                "head.mlp.0.weight": torch.zeros(8, 1024),
            },
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0]}]},
            "epoch": 250,
            "args": argparse.Namespace(arch="vit_large", patch_size=16, out_dim=8192),
            "ibot_loss": {"center": torch.zeros(1, 8), "center2": torch.zeros(1, 1, 8)},
        },
    }
    paths = {}
    for name, content in files.items():
        paths[name] = root / name
        if name == "vicregl_resnet50_full.pth":
            _save_without_module(content, paths[name])
        else:
            torch.save(content, paths[name])
    return paths


def _swin_tiny_state_dict() -> dict[str, Tensor]:
    """iBOT's Swin-T backbone keys and shapes, each tensor a zero-stride view (the file stays tiny)."""
    import timm

    with torch.device("meta"):
        swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)
    return {key: torch.zeros(1).expand(value.shape) for key, value in swin.state_dict().items()}


CASES = [
    # (file, --arch, reference network, checkpoint keys that apply)
    ("dino_resnet50_pretrain.pth", "resnet50", "resnet50", ["teacher"]),
    ("dino_resnet50_full.pth", "resnet50", "resnet50", ["teacher", "student"]),
    ("resnet50_alpha0.9.pth", "resnet50", "resnet50", ["teacher"]),
    ("vicregl_resnet50_full.pth", "resnet50", "resnet50", ["teacher"]),
    ("convnext_small_alpha0.75.pth", "convnext_small", "convnext_small", ["teacher"]),
    ("vicregl_convnext_small_full.pth", "convnext_small", "convnext_small", ["teacher"]),
    ("ibot_vitl16_checkpoint_teacher.pth", "vit_large", "vit_large", ["teacher"]),
    ("ibot_vitl16_checkpoint.pth", "vit_large", "vit_large", ["teacher", "student"]),
]
FORMATS = {
    "dino_resnet50_pretrain.pth": "bare backbone state dict",
    "dino_resnet50_full.pth": "full student/teacher checkpoint",
    "resnet50_alpha0.9.pth": "bare backbone state dict",
    "vicregl_resnet50_full.pth": "VICRegL layout",
    "convnext_small_alpha0.75.pth": "bare backbone state dict",
    "vicregl_convnext_small_full.pth": "VICRegL layout",
    "ibot_vitl16_checkpoint_teacher.pth": "iBOT release layout",
    "ibot_vitl16_checkpoint.pth": "full student/teacher checkpoint",
}


def _images() -> Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _assert_same_network(model: nn.Module, reference: nn.Module) -> None:
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = _images()
    with torch.no_grad():
        pooled, dense = model.forward_features(images)
        ref_pooled, ref_dense = reference.forward_features(images)
        assert torch.equal(model(images), reference(images))
    assert torch.equal(pooled, ref_pooled) and torch.equal(dense, ref_dense)


@pytest.mark.parametrize(("file_name", "arch", "network", "keys"), CASES)
def test_released_layout_loads_the_writing_network(
    file_name, arch, network, keys, networks, release_files, caplog
) -> None:
    for key in keys:
        reference = networks[network if key == "teacher" else f"{network}_student"]
        with caplog.at_level(logging.INFO, logger="cribo_utils.weights.checkpoint_formats"):
            model = cf.build_pretrained_backbone(
                arch, 16, weights=release_files[file_name], checkpoint_key=key
            )
        _assert_same_network(model, reference)
        loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
        assert FORMATS[file_name] in loaded[-1] and file_name in loaded[-1], loaded


def test_vicregl_full_checkpoint_is_read_without_running_or_importing_code(release_files, caplog) -> None:
    path = release_files["vicregl_resnet50_full.pth"]
    # The plain unpickler would need VICRegL's optimizers module; weights_only refuses the function.
    with pytest.raises(ModuleNotFoundError, match="optimizers"):
        torch.load(path, weights_only=False)
    with caplog.at_level(logging.INFO, logger="cribo_utils.weights.checkpoint_formats"):
        checkpoint = cf.load_checkpoint_file(path)
    assert "optimizers" not in sys.modules
    assert "optimizers.exclude_bias_and_norm" in caplog.text
    stand_in = checkpoint["optimizer"]["param_groups"][0]["weight_decay_filter"]
    with pytest.raises(cf.CheckpointFormatError, match="never runs it"):
        stand_in(torch.zeros(1))
    assert cf.detect_checkpoint_format(checkpoint) == "model"
    backbone = cf.extract_backbone_state_dict(checkpoint)
    assert "conv1.weight" in backbone and not any("projector" in k or "classifier" in k for k in backbone)


def test_other_pickled_functions_are_still_refused(tmp_path) -> None:
    path = tmp_path / "payload.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": shutil.rmtree}, path)
    with pytest.raises(cf.CheckpointFormatError, match="it pickles shutil.rmtree") as info:
        cf.load_checkpoint_file(path)
    message = str(info.value)
    assert (
        "re-sav" not in message.lower() and "weights_only set to False" not in message and "\n" not in message
    )


@pytest.mark.parametrize(
    ("file_name", "arch", "expected"),
    [
        ("convnext_small_alpha0.75.pth", "vit_small", "holds a ConvNeXt-Small (VICRegL key names) backbone"),
        ("convnext_small_alpha0.75.pth", "convnext_base", "pass --arch convnext_small"),
        ("vicregl_resnet50_full.pth", "convnext_small", "holds a ResNet-50 (torchvision key names) backbone"),
        ("dino_resnet50_pretrain.pth", "vit_base", "pass --arch resnet50"),
        ("ibot_vitl16_checkpoint_teacher.pth", "vit_base", "pass --arch vit_large --patch_size 16"),
    ],
)
def test_wrong_arch_is_one_line_naming_what_the_file_holds(release_files, file_name, arch, expected) -> None:
    with pytest.raises(cf.CheckpointFormatError) as info:
        cf.build_pretrained_backbone(arch, 16, weights=release_files[file_name])
    message = str(info.value)
    assert expected in message and file_name in message
    assert (
        "\n" not in message
        and "check --arch and --patch_size" not in message
        and "missing keys" not in message
    )


def test_swin_and_timm_convnext_files_are_recognised(tmp_path) -> None:
    import timm

    swin = tmp_path / "ibot_swint_checkpoint_teacher.pth"
    torch.save({"state_dict": _swin_tiny_state_dict()}, swin)
    for arch in ("vit_small", "convnext_tiny"):
        with pytest.raises(cf.CheckpointFormatError, match="holds a Swin-T \\(Swin Transformer\\)") as info:
            cf.build_pretrained_backbone(arch, 16, weights=swin)
        assert "no Swin Transformer" in str(info.value) and "--patch_size" not in str(info.value)
    with torch.device("meta"):
        timm_convnext = timm.create_model("convnext_tiny", num_classes=0)
    timm_file = tmp_path / "convnext_tiny_timm.pth"
    torch.save({k: torch.zeros(1).expand(v.shape) for k, v in timm_convnext.state_dict().items()}, timm_file)
    with pytest.raises(cf.CheckpointFormatError, match="ConvNeXt-Tiny \\(timm key names\\).*VICRegL's"):
        cf.build_pretrained_backbone("vit_small", 16, weights=timm_file)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "is a text file"),
        (b"<html><body>404 Not Found</body></html>", "is a text file"),
        (b"", "the file is empty"),
        (bytes(range(256)), "not a torch checkpoint"),
    ],
)
def test_non_checkpoint_files_say_so(tmp_path, content, expected) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(cf.CheckpointFormatError, match=expected) as info:
        cf.load_checkpoint_file(path)
    assert str(path) in str(info.value) and "KeyError" not in str(info.value)


@pytest.mark.parametrize(
    ("entry_point", "file_name", "network"),
    [
        ("dino_resnet50", "dino_resnet50_pretrain.pth", "resnet50"),
        ("vicregl_resnet50_alpha0p9", "vicregl_resnet50_full.pth", "resnet50"),
        ("vicregl_convnext_small_alpha0p75", "convnext_small_alpha0.75.pth", "convnext_small"),
        ("ibot_vitl16", "ibot_vitl16_checkpoint_teacher.pth", "vit_large"),
    ],
)
def test_released_model_and_hubconf_entry_points(
    entry_point, file_name, network, networks, release_files
) -> None:
    path = release_files[file_name]
    _assert_same_network(cf.load_released_model(entry_point, path), networks[network])
    model = torch.hub.load(REPO_DIR, entry_point, source="local", weights=str(path))
    _assert_same_network(model, networks[network])


def test_hubconf_conv_entry_point_refuses_another_arch(release_files) -> None:
    with pytest.raises(cf.CheckpointFormatError, match="pass --arch resnet50"):
        cf.load_released_model("vicregl_convnext_base_alpha0p9", release_files["resnet50_alpha0.9.pth"])


def test_cli_reports_a_wrong_file_in_one_line_without_traceback(release_files) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "eval_knn.py",
            "--arch",
            "vit_small",
            "--pretrained_weights",
            str(release_files["convnext_small_alpha0.75.pth"]),
            "--synthetic_num_train",
            "4",
            "--synthetic_num_val",
            "2",
            "--num_workers",
            "0",
        ],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("eval_knn.py: error: ") and "pass --arch convnext_small" in last_line
    assert "Traceback" not in completed.stderr


# ------------------------------------------------------------------------------------------------
# The three evaluations on the released layouts (synthetic scenes, tiny inputs)
# ------------------------------------------------------------------------------------------------

EVAL_CASES = [
    ("resnet50", "vicregl_resnet50_full.pth", 2048),
    ("convnext_small", "convnext_small_alpha0.75.pth", 768),
    ("vit_large", "ibot_vitl16_checkpoint.pth", 1024),
]


def _classification_argv(arch: str, weights: Path, output: Path) -> list[str]:
    return [
        "--arch",
        arch,
        "--pretrained_weights",
        str(weights),
        "--synthetic_num_train",
        "8",
        "--synthetic_num_val",
        "4",
        "--image_size",
        "64",
        "--batch_size_per_gpu",
        "4",
        "--num_workers",
        "0",
        "--output_json",
        str(output),
    ]


@pytest.mark.parametrize(("arch", "file_name", "width"), EVAL_CASES)
def test_eval_knn_on_released_layouts(arch, file_name, width, networks, release_files, tmp_path) -> None:
    """eval_knn.py's features are the writing network's global features of the same images."""
    import eval_knn
    from cribo_utils.eval.features import build_classification_split, resolve_image_sizes
    from cribo_utils.eval.knn import get_args_parser
    from data.transforms import eval_transform

    output = tmp_path / "knn.json"
    argv = _classification_argv(arch, release_files[file_name], output) + ["--nb_knn", "2", "--dump_features"]
    argv.append(str(tmp_path / "features"))
    results = eval_knn.main(argv)
    assert results["arch"] == arch and output.is_file()
    expected = "[CLS]" if arch == "vit_large" else "global-average-pooled"
    assert expected in results["protocol"]
    dumped = torch.load(tmp_path / "features" / "trainfeat.pth", weights_only=True)
    args = get_args_parser().parse_args(argv)
    resize, crop = resolve_image_sizes(args)
    train_set = build_classification_split(args, "train", eval_transform(resize=resize, crop=crop))
    with torch.no_grad():
        reference = networks[arch](torch.stack([train_set[i][0] for i in range(len(train_set))]))
    assert dumped.shape == (8, width)
    assert torch.allclose(dumped, torch.nn.functional.normalize(reference, dim=1), atol=1e-5)


@pytest.mark.parametrize(("arch", "file_name", "width"), EVAL_CASES)
def test_eval_linear_on_released_layouts(arch, file_name, width, release_files, tmp_path) -> None:
    import eval_linear

    output = tmp_path / "linear.json"
    argv = _classification_argv(arch, release_files[file_name], output)
    results = eval_linear.main(
        [*argv, "--epochs", "1", "--n_last_blocks", "1", "--avgpool_patchtokens", "false"]
    )
    assert results["feature_dim"] == width and results["arch"] == arch
    assert 0.0 <= results["last_top1"] <= 100.0


@pytest.mark.parametrize(("arch", "file_name", "width"), EVAL_CASES)
def test_eval_dense_nn_on_released_layouts(arch, file_name, width, release_files, tmp_path) -> None:
    import eval_dense_nn

    output = tmp_path / "dense.json"
    results = eval_dense_nn.main(
        [
            "--arch",
            arch,
            "--pretrained_weights",
            str(release_files[file_name]),
            "--synthetic_image_size",
            "64",
            "--synthetic_num_train",
            "4",
            "--synthetic_num_val",
            "2",
            "--batch_size_per_gpu",
            "2",
            "--num_workers",
            "0",
            "--augmentation_epochs",
            "1",
            "--num_neighbours",
            "3",
            "--output_json",
            str(output),
            "--no_progress",
        ]
    )
    stride = 16 if arch == "vit_large" else 32
    assert results["patch_size"] == stride and results["patches_per_image"] == (64 // stride) ** 2
    assert results["memory_entries"] == 4 * (64 // stride) ** 2 and 0.0 <= results["miou"] <= 1.0
    assert results["arch"] == arch and output.is_file()


def test_eval_dense_nn_with_an_earlier_conv_stage(release_files, tmp_path) -> None:
    """--dense_stage 3: ResNet-50's layer3 (stride 16, 1024 channels) as the dense grid."""
    import eval_dense_nn

    argv = ["--arch", "resnet50", "--pretrained_weights", str(release_files["resnet50_alpha0.9.pth"])]
    argv += ["--dense_stage", "3", "--synthetic_image_size", "64", "--synthetic_num_train", "2"]
    argv += ["--synthetic_num_val", "2", "--num_workers", "0", "--augmentation_epochs", "1"]
    argv += ["--num_neighbours", "3", "--output_json", str(tmp_path / "dense.json"), "--no_progress"]
    results = eval_dense_nn.main(argv)
    assert results["patch_size"] == 16 and results["memory_entries"] == 2 * 16


@pytest.mark.parametrize("arch", ["convnext_tiny", "convnext_base"])
def test_eval_knn_accepts_the_other_convnext_sizes(arch, tmp_path) -> None:
    """The other sizes take the same path (random weights here: their files would be 100-350 MB)."""
    import eval_knn

    argv = ["--arch", arch, "--synthetic_num_train", "4", "--synthetic_num_val", "2", "--image_size", "32"]
    argv += ["--nb_knn", "2", "--num_workers", "0", "--output_json", str(tmp_path / "knn.json")]
    assert eval_knn.main(argv)["arch"] == arch
