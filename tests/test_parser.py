"""Flag resolution: reference defaults < synthetic preset < --config file < explicit flags."""

import json

import pytest

from cribo_utils.parser import SYNTHETIC_PRESET, ConfigError, resolve_args, validate_args


def test_no_arguments_uses_the_synthetic_preset():
    args = resolve_args([])
    assert args.dataset_type == "synthetic"
    for key, value in SYNTHETIC_PRESET.items():
        got = getattr(args, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_explicit_flags_override_the_preset():
    args = resolve_args(["--epochs", "3", "--arch", "vit_small"])
    assert args.epochs == 3 and args.arch == "vit_small"
    assert args.image_size == SYNTHETIC_PRESET["image_size"]


def test_real_dataset_keeps_reference_defaults():
    args = resolve_args(["--data_path", "/some/imagenet"])
    assert args.dataset_type == "imagenet1k"
    assert (args.arch, args.out_dim, args.batch_size_per_gpu, args.epochs, args.n_tokens) == (
        "vit_small",
        65536,
        128,
        300,
        32,
    )


@pytest.mark.parametrize("name", ["vits16-in", "vits16-coco", "vitb16-in"])
def test_released_argument_files_parse_and_apply(name):
    path = f"checkpoints/{name}_args.json"
    released = json.load(open(path))
    args = resolve_args(["--config", path, "--data_path", "/data", "--epochs", "7"])
    assert args.epochs == 7  # explicit flag wins
    assert args.data_path == "/data"  # placeholder "." never overrides a real value
    assert args.output_dir == "output"  # placeholder output_dir ignored
    for key in (
        "arch",
        "out_dim",
        "n_tokens",
        "batch_size_per_gpu",
        "lr",
        "min_lr",
        "clip_grad",
        "norm_last_layer",
        "freeze_last_layer",
        "warmup_teacher_temp_epochs",
        "queue_size",
        "dataset_type",
    ):
        assert getattr(args, key) == released[key], key
    assert list(args.pos_alpha) == released["pos_alpha"]


def test_config_with_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"arch": "vit_tiny", "learning_rate": 0.1}))
    with pytest.raises(SystemExit, match="learning_rate"):
        resolve_args(["--config", str(path)])


def _valid(**overrides):
    args = resolve_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ({"arch": "vit_huge"}, 1, "--arch vit_huge"),
        ({"image_size": 100}, 1, "not divisible"),
        ({"n_tokens": 1000}, 1, "--n_tokens 1000"),
        ({"queue_size": 16, "batch_size_per_gpu": 32}, 1, "--queue_size 16"),
        ({"queue_size": 40, "batch_size_per_gpu": 16}, 4, "one global batch"),
        ({"local_crops_number": 2}, 1, "local_crops_number"),
        ({"dataset_type": "imagenet1k", "data_path": ""}, 1, "needs --data_path"),
        ({"dataset_type": "coco", "data_path": "/coco", "synthetic_recolour_views": True}, 1, "re-coloured"),
    ],
)
def test_bad_configurations_fail_with_one_line(overrides, world, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate_args(_valid(**overrides), world)
    assert "\n" not in str(error.value)


def test_valid_preset_passes_validation():
    validate_args(_valid(), 1)
