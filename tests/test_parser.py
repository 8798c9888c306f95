"""Flag resolution: reference defaults < preset < --config file < explicit flags; released-run notes."""

import json
import re

import pytest

from cribo_utils.train import args_as_plain_dict
from cribo_utils.train.parser import (
    SYNTHETIC_PRESET,
    ConfigError,
    describe_preset,
    get_args_parser,
    preset_changes,
    release_batch_note,
    released_run,
    resolve_args,
    validate_args,
)


def test_no_arguments_uses_the_synthetic_preset():
    args = resolve_args([])
    assert args.dataset_type == "synthetic" and args.preset == "synthetic_cpu"
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


def test_local_crop_keys_of_released_files_load_and_local_crops_are_flags(tmp_path):
    """Released files carry local_crops_* with local_crops_number 0: they load as the flags they name."""
    path = tmp_path / "args.json"
    released = {"local_crops_number": 0, "local_crops_scale": [0.05, 0.4], "local_crops_size": 96}
    path.write_text(json.dumps(released))
    args = resolve_args(["--config", str(path)])
    assert (args.local_crops_number, args.local_crops_scale, args.local_crops_size) == (0, (0.05, 0.4), 96)
    args = resolve_args(
        ["--local_crops_number", "2", "--local_crops_size", "48", "--local_crops_scale", "0.1", "0.3"]
    )
    validate_args(args, world_size=1)
    assert (args.local_crops_number, args.local_crops_scale, args.local_crops_size) == (2, (0.1, 0.3), 48)
    with pytest.raises(SystemExit):  # argparse: unrecognized argument
        resolve_args(["--synthetic_num_val", "2"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--local_crops_number", "-1"], "--local_crops_number -1: must be 0 or more"),
        (
            ["--local_crops_number", "2", "--local_crops_size", "40"],
            "not a positive multiple of --patch_size",
        ),
        (["--local_crops_number", "2", "--local_crops_scale", "0.5", "0.2"], "--local_crops_scale 0.5 0.2"),
        (
            ["--local_crops_number", "2", "--local_crops_scale", "0.5"],
            "--local_crops_scale 0.5: expected two",
        ),
        (["--global_crops_scale", "0.5", "0.2"], "--global_crops_scale 0.5 0.2: expected two values"),
        (["--global_crops_scale", "0.5"], "--global_crops_scale 0.5: expected two values"),
    ],
)
def test_bad_crop_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        validate_args(resolve_args(flags), world_size=1)
    assert "\n" not in str(error.value)


def test_an_earlier_args_json_with_synthetic_num_val_still_loads(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**args_as_plain_dict(resolve_args([])), "synthetic_num_val": 500}))
    assert "synthetic_num_val" not in vars(resolve_args(["--config", str(path)]))


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
        ({"dataset_type": "imagenet1k", "data_path": ""}, 1, "needs --data_path"),
        ({"dataset_type": "coco", "data_path": "/coco", "synthetic_recolour_views": True}, 1, "re-coloured"),
        (
            {"synthetic_recolour_views": False, "synthetic_recolour_background": True},
            1,
            "needs --synthetic_recolour_views true",
        ),
        (
            {
                "synthetic_recolour_views": False,
                "synthetic_recolour_background": False,
                "synthetic_retexture_views": True,
            },
            1,
            "--synthetic_retexture_views true needs --synthetic_recolour_views true",
        ),
    ],
)
def test_bad_configurations_fail_with_one_line(overrides, world, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate_args(_valid(**overrides), world)
    assert "\n" not in str(error.value)


def test_valid_preset_passes_validation():
    validate_args(_valid(), 1)


# --------------------------------------------------------------------------------------------------
# The preset: applied by default only when no dataset is named, switched by --preset (issue 15)


def _reference_default(key):
    value = get_args_parser().get_default(key)
    return list(value) if isinstance(value, tuple) else value


def _as_plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_explicit_synthetic_dataset_type_keeps_the_reference_defaults():
    args = resolve_args(["--dataset_type", "synthetic"])
    assert args.preset == "none"
    assert (args.teacher_temp, args.teacher_temp_c, args.arch, args.queue_size) == (
        0.07,
        0.07,
        "vit_small",
        25000,
    )
    assert describe_preset(args).startswith("preset none: the synthetic scenes with the reference defaults")


def test_preset_none_turns_the_preset_off():
    args = resolve_args(["--preset", "none"])
    assert args.dataset_type == "synthetic" and args.preset == "none"
    for key in SYNTHETIC_PRESET:
        assert _as_plain(getattr(args, key)) == _reference_default(key), key


def test_preset_synthetic_cpu_applies_under_an_explicit_dataset_type_and_flags_still_win():
    args = resolve_args(["--dataset_type", "synthetic", "--preset", "synthetic_cpu", "--epochs", "3"])
    assert args.preset == "synthetic_cpu" and args.epochs == 3
    assert args.teacher_temp == SYNTHETIC_PRESET["teacher_temp"]


def test_preset_synthetic_cpu_with_a_real_dataset_is_an_error():
    with pytest.raises(ConfigError, match="--preset synthetic_cpu") as error:
        resolve_args(["--preset", "synthetic_cpu", "--data_path", "/some/imagenet"])
    assert "\n" not in str(error.value)


def test_unknown_preset_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"preset": "synthetic_gpu"}))
    with pytest.raises(ConfigError, match="--preset synthetic_gpu: unknown preset"):
        resolve_args(["--config", str(path)])


def test_start_up_line_lists_every_value_the_preset_changed():
    args = resolve_args(["--epochs", "3"])  # an explicit flag: the preset did not change epochs
    changed = {key for key, value in SYNTHETIC_PRESET.items() if value != _reference_default(key)}
    assert set(preset_changes(args)) == changed - {"epochs"}
    line = describe_preset(args)
    assert "--preset none" in line and "\n" not in line
    assert f"changed {len(changed) - 1} value(s)" in line
    for key in changed - {"epochs"}:
        assert f" {key} {_reference_default(key)} -> {SYNTHETIC_PRESET[key]}" in line, key
    assert " epochs " not in line


def test_written_args_json_loads_back_as_config(tmp_path):
    args = resolve_args(["--epochs", "3"])
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**args_as_plain_dict(args), "used_synthetic_preset": True}))  # older files
    reloaded = resolve_args(["--config", str(path)])
    assert args_as_plain_dict(reloaded) == {**args_as_plain_dict(args), "config": str(path)}


# --------------------------------------------------------------------------------------------------
# Released argument files on another world size (issue 15)

RELEASED = ["vits16-in", "vits16-coco", "vitb16-in"]


@pytest.mark.parametrize("name", RELEASED)
def test_every_release_records_its_global_batch_and_world_size(name):
    release = released_run(f"checkpoints/{name}_args.json")
    released = json.load(open(f"checkpoints/{name}_args.json"))
    # the reference README's batch-size column: 256 (COCO), 1024 (both ImageNet runs)
    assert release["global_batch"] == {"vits16-coco": 256, "vits16-in": 1024, "vitb16-in": 1024}[name]
    assert release["world_size"] * released["batch_size_per_gpu"] == release["global_batch"]
    assert release["source"]


def test_released_config_on_one_process_says_how_to_match_the_release():
    args = resolve_args(["--config", "checkpoints/vits16-in_args.json", "--data_path", "/data"])
    note = release_batch_note(args, world_size=1)
    assert "\n" not in note
    for part in (
        "vits16-in_args.json",
        "8 x 128 = global batch 1024",
        "peak lr 2.00e-03",
        "1 process(es) x 128 = global batch 128",
        "peak lr 2.50e-04",
        "8x more slowly",
        "run 8 processes",
        "--batch_size_per_gpu 128",
        "--batch_size 1024",
    ):
        assert part in note, part
    assert release_batch_note(args, world_size=8) is None  # the release's own world size: nothing to say


def test_released_config_notes_other_world_sizes_and_ignores_other_files(tmp_path):
    vitb = resolve_args(["--config", "checkpoints/vitb16-in_args.json", "--data_path", "/data"])
    assert "run 16 processes" in release_batch_note(vitb, world_size=8)
    same_batch = resolve_args(
        ["--config", "checkpoints/vits16-in_args.json", "--data_path", "/d", "--batch_size_per_gpu", "256"]
    )
    assert "the same global batch" in release_batch_note(same_batch, world_size=4)
    own = tmp_path / "args.json"
    own.write_text(json.dumps({"arch": "vit_tiny"}))
    assert release_batch_note(resolve_args(["--config", str(own)]), world_size=1) is None
    assert release_batch_note(resolve_args([]), world_size=1) is None


@pytest.mark.parametrize("name", ["realistic", "redrawn"])
def test_named_synthetic_views_set_the_three_rendering_flags(name, tmp_path):
    from data.synthetic import SYNTHETIC_VIEWS, synthetic_view_flags, synthetic_views_name

    args = resolve_args(["--synthetic_views", name])
    assert synthetic_view_flags(args) == SYNTHETIC_VIEWS[name]
    assert synthetic_views_name(synthetic_view_flags(args)) == name
    validate_args(args, world_size=1)
    # agreeing explicit flags are fine; a config file written by the run loads back unchanged
    resolve_args(["--synthetic_views", name, "--synthetic_recolour_views", str(name == "redrawn").lower()])
    config = tmp_path / "args.json"
    config.write_text(json.dumps(args_as_plain_dict(args)))
    assert synthetic_view_flags(resolve_args(["--config", str(config)])) == SYNTHETIC_VIEWS[name]


def test_named_synthetic_views_contradicted_by_a_flag_is_a_one_line_error():
    with pytest.raises(
        ConfigError, match="--synthetic_views realistic sets --synthetic_recolour_background false"
    ):
        resolve_args(["--synthetic_views", "realistic", "--synthetic_recolour_background", "true"])
    assert resolve_args([]).synthetic_views is None  # the preset keeps its three flags (redrawn)
