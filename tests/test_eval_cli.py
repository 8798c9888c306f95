"""The evaluations' command lines: the dataset comes from --data_path, contradictions and unknown layouts stop
in one line, DINO's flags and one spelling per concept, one boolean style, result files per dataset and
protocol, the write check before any work."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cribo_utils.eval.cli import EvalConfigError, check_writable
from cribo_utils.runtime.distributed import LaunchConfig, apply_dist_url
from cribo_utils.runtime.flags import bool_flag
from data.datasets import DatasetLayoutError
from data.layouts import detect_layout, resolve_dataset
from tests.fixtures_datasets import make_ade20k, make_coco_folder, make_imagefolder, make_voc

REPO = Path(__file__).resolve().parents[1]
CLASSIFICATION = ("synthetic", "imagenet1k", "imagefolder")
SEGMENTATION = ("synthetic", "voc", "ade20k")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    import eval_dense_nn
    from cribo_utils.eval.knn import get_args_parser as knn_parser
    from cribo_utils.eval.linear_runner import get_args_parser as linear_parser
    from cribo_utils.train.parser import get_args_parser as train_parser

    return {
        "main_cribo.py": train_parser(),
        "eval_knn.py": knn_parser(),
        "eval_linear.py": linear_parser(),
        "eval_dense_nn.py": eval_dense_nn.get_args_parser(),
    }


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "classes", "expected"),
    [
        ("split", ("n01440764", "n01443537"), "imagenet1k"),
        ("ilsvrc", ("cat", "dog"), "imagenet1k"),
        ("split", ("cat", "dog"), "imagefolder"),
        ("classes", ("cat", "dog"), "imagefolder"),
    ],
)
def test_detect_classification_layouts(tmp_path: Path, layout: str, classes: tuple, expected: str) -> None:
    info = make_imagefolder(tmp_path / "data", classes=classes, images_per_class=1, layout=layout)
    assert detect_layout(info.root) == expected


@pytest.mark.parametrize("nesting", ["VOC2012", "VOCdevkit", "none"])
def test_detect_voc_at_every_nesting(tmp_path: Path, nesting: str) -> None:
    info = make_voc(tmp_path / "voc", num_train=1, num_val=1, num_aug=0, nesting=nesting)
    assert detect_layout(info.root) == "voc"


@pytest.mark.parametrize("parent", [True, False])
def test_detect_ade20k_and_coco(tmp_path: Path, parent: bool) -> None:
    assert detect_layout(make_ade20k(tmp_path / "ade", 1, 1, parent=parent).root) == "ade20k"
    assert detect_layout(make_coco_folder(tmp_path / "coco", num_images=1).root) == "coco"


def test_unknown_layout_names_what_it_found_and_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError) as error:
        detect_layout(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "empty/, notes.txt" in message
    assert "ImageNet" in message and "Pascal VOC" in message and "ADE20K" in message
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        detect_layout(tmp_path / "missing")


def test_resolve_dataset_rules(tmp_path: Path) -> None:
    imagenet = make_imagefolder(tmp_path / "in", images_per_class=1).root
    voc = make_voc(tmp_path / "voc", num_train=1, num_val=1, num_aug=0).root
    assert resolve_dataset(None, None, CLASSIFICATION, "eval_knn.py") == "synthetic"
    assert resolve_dataset(None, str(imagenet), CLASSIFICATION, "eval_knn.py") == "imagenet1k"
    # The two class-folder names read the same folders: naming one for the other is no contradiction.
    assert resolve_dataset("imagefolder", str(imagenet), CLASSIFICATION, "eval_knn.py") == "imagefolder"
    assert resolve_dataset(None, str(voc), SEGMENTATION, "eval_dense_nn.py") == "voc"
    with pytest.raises(DatasetLayoutError, match=r"--dataset_type synthetic contradicts .* ImageNet-1k"):
        resolve_dataset("synthetic", str(imagenet), CLASSIFICATION, "eval_knn.py")
    with pytest.raises(DatasetLayoutError, match=r"--dataset_type ade20k contradicts .* Pascal VOC"):
        resolve_dataset("ade20k", str(voc), SEGMENTATION, "eval_dense_nn.py")
    with pytest.raises(DatasetLayoutError, match=r"holds Pascal VOC .* eval_knn.py does not evaluate"):
        resolve_dataset(None, str(voc), CLASSIFICATION, "eval_knn.py")
    with pytest.raises(DatasetLayoutError, match="--dataset_type voc needs --data_path"):
        resolve_dataset("voc", None, SEGMENTATION, "eval_dense_nn.py")


# ------------------------------------------------------------------------------------------------
# The silent-evaluation case: every evaluation evaluates what --data_path holds
# ------------------------------------------------------------------------------------------------

_SMALL = ["--arch", "vit_tiny", "--depth", "2", "--num_workers", "0", "--batch_size_per_gpu", "4"]


def test_knn_evaluates_the_folder_given_as_data_path(tmp_path: Path) -> None:
    import eval_knn

    info = make_imagefolder(tmp_path / "imagenet", images_per_class=3, size=(40, 40))
    argv = [*_SMALL, "--data_path", str(info.root), "--image_size", "32", "--resize", "36", "--nb_knn", "2"]
    results = eval_knn.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert results["dataset"] == "imagenet1k" and results["data_path"] == str(info.root)
    assert results["num_classes"] == 3 and results["num_train"] == 9 and results["num_val"] == 9
    written = json.loads((tmp_path / "out" / "eval_knn_imagenet1k.json").read_text())
    assert written["dataset"] == "imagenet1k" and written["num_train"] == 9


def test_linear_evaluates_the_folder_given_as_data_path(tmp_path: Path) -> None:
    import eval_linear

    info = make_imagefolder(tmp_path / "imagenet", images_per_class=2, size=(40, 40))
    argv = [*_SMALL, "--data_path", str(info.root), "--image_size", "32", "--resize", "36", "--epochs", "1"]
    results = eval_linear.main([*argv, "--n_last_blocks", "1", "--output_dir", str(tmp_path / "out")])
    assert results["dataset"] == "imagenet1k" and results["num_classes"] == 3 and results["num_train"] == 6
    assert results["train_aug"] is True  # DINO's augmented protocol for a folder dataset
    assert (tmp_path / "out" / "eval_linear_imagenet1k.json").is_file()


def test_dense_nn_evaluates_the_folder_given_as_data_path(tmp_path: Path) -> None:
    import eval_dense_nn

    info = make_voc(tmp_path / "voc", num_train=2, num_val=2, num_aug=1, size=(48, 40))
    argv = [*_SMALL, "--data_path", str(info.root), "--image_size", "32", "--memory_size", "24"]
    argv += ["--augmentation_epochs", "2", "--nb_knn", "3", "--progress", "false"]
    results = eval_dense_nn.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert results["dataset"] == "voc" and results["num_classes"] == 21 and results["num_train_images"] == 3
    assert results["protocol_name"] == "voc"
    assert results["protocol_overrides"] == {"image_size": 32, "memory_size": 24, "nb_knn": 3}
    assert results["output_json"] == str(tmp_path / "out" / "eval_dense_nn_voc_custom.json")


def test_a_contradiction_stops_in_one_line_before_any_work(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc", num_train=1, num_val=1, num_aug=0).root
    completed = subprocess.run(
        [sys.executable, "eval_knn.py", "--data_path", str(voc), "--output_dir", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 1 and len(lines) == 1, completed.stderr
    assert lines[0].startswith("eval_knn.py: error: --data_path ") and "Pascal VOC" in lines[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Result files and the write check
# ------------------------------------------------------------------------------------------------


def test_unwritable_output_dir_fails_before_any_data_is_read(tmp_path: Path, monkeypatch) -> None:
    import eval_linear
    from cribo_utils.eval import linear_runner

    def no_data(*args, **kwargs):
        raise AssertionError("the write check must come before any data is read")

    monkeypatch.setattr(linear_runner, "build_classification_split", no_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(EvalConfigError, match=r"cannot write the results to .*a_file.* --output_dir"):
        eval_linear.main([*_SMALL, "--output_dir", str(blocker / "results")])


def test_a_result_of_other_weights_is_never_overwritten(tmp_path: Path) -> None:
    import eval_knn
    from models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=32, depth=2)
    for name in ("checkpoint0001.pth", "checkpoint.pth"):
        torch.save(
            {"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, tmp_path / name
        )
    argv = ["--synthetic_num_train", "8", "--synthetic_num_val", "4", "--image_size", "32", "--nb_knn", "2"]
    argv += ["--num_workers", "0"]
    eval_knn.main([*argv, "--pretrained_weights", str(tmp_path / "checkpoint0001.pth")])
    eval_knn.main(
        [*argv, "--pretrained_weights", str(tmp_path / "checkpoint0001.pth")]
    )  # a rerun replaces it
    with pytest.raises(
        EvalConfigError, match=r"eval_knn_synthetic.json holds the result of .*checkpoint0001"
    ):
        eval_knn.main([*argv, "--pretrained_weights", str(tmp_path / "checkpoint.pth")])
    written = json.loads((tmp_path / "eval_knn_synthetic.json").read_text())
    assert written["pretrained_weights"].endswith("checkpoint0001.pth")
    eval_knn.main(
        [*argv, "--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--output_dir", str(tmp_path / "b")]
    )


def test_check_writable_creates_the_folder(tmp_path: Path) -> None:
    path = check_writable(tmp_path / "a" / "b" / "r.json")
    assert path.parent.is_dir() and list(path.parent.iterdir()) == []


def test_result_names_per_dataset_and_protocol(tmp_path: Path) -> None:
    from cribo_utils.eval.dense_nn.cli import get_args_parser, resolve_dense_args

    voc = make_voc(tmp_path / "voc", num_train=1, num_val=1, num_aug=0).root
    ade = make_ade20k(tmp_path / "ade", 1, 1).root
    weights = tmp_path / "run" / "checkpoint.pth"

    def result(*argv: str) -> tuple[Path, argparse.Namespace]:
        args = get_args_parser().parse_args(["--pretrained_weights", str(weights), *argv])
        return resolve_dense_args(args), args

    voc_file, voc_args = result("--data_path", str(voc))
    ade_file, ade_args = result("--data_path", str(ade))
    assert voc_file == weights.parent / "eval_dense_nn_voc.json"
    assert ade_file == weights.parent / "eval_dense_nn_ade20k.json"
    assert (voc_args.image_size, voc_args.memory_size, voc_args.nb_knn, voc_args.temperature) == (
        512,
        10_240_000,
        30,
        0.02,
    )
    assert voc_args.augmentation_epochs == 2 and voc_args.protocol_overrides == {}
    same, _ = result("--data_path", str(voc), "--protocol", "voc", "--nb_knn", "30")  # the protocol's own k
    assert same == voc_file
    synthetic_file, synthetic_args = result()
    assert synthetic_file.name == "eval_dense_nn_synthetic.json" and synthetic_args.image_size == 128
    with pytest.raises(EvalConfigError, match="--protocol ade20k is defined on ade20k, but --data_path"):
        result("--data_path", str(voc), "--protocol", "ade20k")


# ------------------------------------------------------------------------------------------------
# Flags: DINO's names, one spelling per concept, one boolean style, defaults in --help
# ------------------------------------------------------------------------------------------------


def test_every_script_accepts_dinos_run_flags() -> None:
    for name, parser in _parsers().items():
        args = parser.parse_args(["--dist_url", "env://", "--seed", "3", "--num_workers", "2"])
        assert args.dist_url == "env://" and args.seed == 3, name
        args = parser.parse_args(["--dist_url", "tcp://10.0.0.1:23456", "--batch_size_per_gpu", "8"])
        assert args.dist_url == "tcp://10.0.0.1:23456" and args.batch_size_per_gpu == 8, name


def test_dist_url_is_checked_when_parsed_and_sets_the_rendezvous(capsys) -> None:
    parser = _parsers()["eval_knn.py"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--dist_url", "file:///tmp/rendezvous"])
    assert "expected env://" in capsys.readouterr().err
    launch = LaunchConfig("torchrun", 1, 1, 4, "127.0.0.1", 29500)
    assert apply_dist_url(launch, "env://") == launch
    assert apply_dist_url(launch, "tcp://node07:23456") == LaunchConfig("torchrun", 1, 1, 4, "node07", 23456)
    assert apply_dist_url(launch, "tcp://[::1]:23456").master_addr == "::1"
    single = LaunchConfig("single", 0, 0, 1)
    assert apply_dist_url(single, "tcp://node07:23456") == single  # one process: no rendezvous


def test_one_spelling_per_concept_with_old_spellings_as_aliases() -> None:
    parsers = _parsers()
    shared = ("--dataset_type", "--data_path", "--image_size", "--batch_size_per_gpu", "--num_workers")
    shared += ("--seed", "--output_dir", "--dist_url")
    for name, parser in parsers.items():
        options = {option for action in parser._actions for option in action.option_strings}
        missing = [flag for flag in shared if flag not in options]
        assert not missing, f"{name} lacks {missing}"
        for action in parser._actions:  # the primary spelling comes first in --help
            if "--dataset" in action.option_strings or "--input_size" in action.option_strings:
                assert action.option_strings[0] in ("--dataset_type", "--image_size"), name
    knn, linear, dense = parsers["eval_knn.py"], parsers["eval_linear.py"], parsers["eval_dense_nn.py"]
    assert knn.parse_args(["--num_neighbours", "5", "--dataset", "synthetic"]).nb_knn == [5]
    assert dense.parse_args(["--num_neighbours", "5", "--input_size", "64"]).nb_knn == 5
    assert dense.parse_args(["--input_size", "64"]).image_size == 64
    assert dense.parse_args(["--no_progress"]).progress is False
    for flag in ("--no_train_aug", "--no-train_aug"):
        assert linear.parse_args([flag]).train_aug is False
    assert linear.parse_args(["--no_cache_features"]).cache_features is False


def test_one_boolean_style_in_the_four_scripts() -> None:
    for name, parser in _parsers().items():
        for action in parser._actions:
            if action.type is bool_flag:
                assert action.nargs == "?" and action.const is True, (name, action.dest)
            elif isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction):
                raise AssertionError(f"{name}: {action.option_strings} is not a --flag true|false boolean")
            elif isinstance(action, argparse._StoreConstAction) and action.const is False:
                assert action.help == argparse.SUPPRESS, (name, action.option_strings)  # old spelling
    linear = _parsers()["eval_linear.py"]
    assert linear.parse_args(["--evaluate"]).evaluate is True  # DINO's bare flag
    assert linear.parse_args(["--avgpool_patchtokens", "false"]).avgpool_patchtokens is False
    assert _parsers()["eval_knn.py"].parse_args(["--use_cuda", "false"]).use_cuda is False
    assert _parsers()["main_cribo.py"].parse_args(["--use_fp16"]).use_fp16 is True


@pytest.mark.parametrize("script", ["eval_knn.py", "eval_linear.py", "eval_dense_nn.py"])
def test_help_shows_every_default(script: str) -> None:
    parser = _parsers()[script]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        if action.default is None:
            continue  # the help text says what an unset flag means
        assert f"(default: {action.default})" in text, (script, action.option_strings)


def test_main_cribo_help_shows_defaults_and_dist_url(capsys) -> None:
    from cribo_utils.train.parser import resolve_args

    with pytest.raises(SystemExit):
        resolve_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dist_url" in text and "(default: env://)" in text and "(default: 0.996)" in text


def test_seed_also_seeds_the_random_initialisation() -> None:
    from cribo_utils.eval.cli import resolve_seeds

    parser = _parsers()["eval_knn.py"]
    assert resolve_seeds(parser.parse_args(["--seed", "5"])).init_seed == 5
    assert resolve_seeds(parser.parse_args(["--seed", "5", "--init_seed", "2"])).init_seed == 2


def test_knn_features_round_trip_through_dump_and_load(tmp_path: Path) -> None:
    import eval_knn

    argv = [*_SMALL, "--synthetic_num_train", "12", "--synthetic_num_val", "6", "--image_size", "32"]
    argv += ["--nb_knn", "3", "5"]
    first = eval_knn.main([*argv, "--output_dir", str(tmp_path), "--dump_features", str(tmp_path / "f")])
    again = eval_knn.main(
        ["--load_features", str(tmp_path / "f"), "--nb_knn", "3", "5", "--output_dir", str(tmp_path / "l")]
    )
    assert again["results"] == first["results"] and again["dataset"] == "synthetic"
    assert again["loaded_from"] == str(tmp_path / "f")
    assert json.loads((tmp_path / "f" / "features.json").read_text())["dataset"] == "synthetic"
    (tmp_path / "f" / "features.json").unlink()  # a folder DINO dumped has no features.json
    argv = ["--load_features", str(tmp_path / "f"), "--nb_knn", "3", "--use_cuda", "false"]
    dino = eval_knn.main([*argv, "--output_dir", str(tmp_path / "d")])
    assert dino["dataset"] == "unknown" and dino["results"]["3"] == first["results"]["3"]
    with pytest.raises(EvalConfigError, match="drop --data_path"):
        eval_knn.main(["--load_features", str(tmp_path / "f"), "--data_path", str(tmp_path)])
    torch.save(torch.zeros(1), tmp_path / "f" / "testfeat.pth")
    (tmp_path / "f" / "testlabels.pth").unlink()
    with pytest.raises(FileNotFoundError, match="testlabels.pth is missing"):
        eval_knn.main(["--load_features", str(tmp_path / "f")])


# ------------------------------------------------------------------------------------------------
# The README's commands and DINO's run as typed (parsed: the datasets are not here)
# ------------------------------------------------------------------------------------------------

_LAUNCHERS = ("main_cribo.py", "eval_knn.py", "eval_linear.py", "eval_dense_nn.py", "run_slurm.sh")


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of every launcher command in the README's bash blocks."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            scripts = [i for i, token in enumerate(tokens) if token in _LAUNCHERS]
            if scripts:
                script = tokens[scripts[0]]
                commands.append(
                    ("main_cribo.py" if script == "run_slurm.sh" else script, tokens[scripts[0] + 1 :])
                )
    return commands


def _parse(script: str, argv: list[str]) -> argparse.Namespace:
    if script == "main_cribo.py":
        from cribo_utils.train.parser import resolve_args

        return resolve_args(argv)
    return _parsers()[script].parse_args(argv)


def test_the_readme_commands_parse_as_written() -> None:
    commands = readme_commands()
    scripts = {script for script, _ in commands}
    assert {"main_cribo.py", "eval_knn.py", "eval_linear.py", "eval_dense_nn.py"} <= scripts
    for script, argv in commands:
        if "..." in argv:
            continue  # an elided path
        _parse(script, argv)  # argparse exits on an unknown or malformed flag


@pytest.mark.parametrize(
    "command",
    [
        "eval_knn.py --pretrained_weights /path/to/checkpoint.pth --checkpoint_key teacher --data_path "
        "/path/to/imagenet --local_rank=0",
        "eval_knn.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 "
        "--data_path /path/to/imagenet --nb_knn 10 20 100 200 --temperature 0.07 --use_cuda false "
        "--dump_features /path/to/features --dist_url env://",
        "eval_knn.py --load_features /path/to/features --nb_knn 20",
        "eval_linear.py --arch vit_small --patch_size 16 --n_last_blocks 4 --avgpool_patchtokens false "
        "--pretrained_weights /path/to/checkpoint.pth --checkpoint_key teacher --data_path /path/to/imagenet "
        "--output_dir /path/to/output --epochs 100 --lr 0.001 --batch_size_per_gpu 128 --num_workers 10 "
        "--val_freq 1 --num_labels 1000 --dist_url env://",
        "eval_linear.py --evaluate --arch vit_small --patch_size 16 --data_path /path/to/imagenet",
        "eval_linear.py --arch vit_base --n_last_blocks 1 --avgpool_patchtokens true --data_path /imagenet",
    ],
)
def test_dinos_evaluation_commands_parse_as_written(command: str) -> None:
    script, *argv = command.split()
    args = _parse(script, argv)
    assert args.dist_url == "env://"
