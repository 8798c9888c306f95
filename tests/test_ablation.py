"""benchmarks/ablation.py without training: the command each row trains with, the score cache, and the
table's mean and half-range (the scoring itself is benchmarks/mechanism.py's and the dense-NN protocol's,
tested in test_mechanism.py and test_dense_nn.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from benchmarks import ablation


def test_mean_and_half_range_by_hand() -> None:
    assert ablation._mean_half_range([1.0, 3.0, 2.0]) == "2.00 ± 1.00"
    assert ablation._mean_half_range([5.0, math.nan]) == "5.00 ± 0.00"  # NaN (no accepted pair) dropped
    assert ablation._mean_half_range([math.nan]) == "-"


def test_each_row_trains_the_default_command_with_its_views_objective_and_seed(monkeypatch, tmp_path) -> None:
    seen = []
    monkeypatch.setattr(ablation.subprocess, "run", lambda command, **kwargs: seen.append((command, kwargs)))
    ablation.train(tmp_path / "run", "realistic", "cross_view", 2, ["--epochs", "1"])
    ((command, kwargs),) = seen
    assert command[1] == "main_cribo.py" and kwargs["cwd"] == ablation.REPO and kwargs["check"]
    flags = command[2:]
    for name, value in (
        ("--synthetic_views", "realistic"),
        ("--objective", "cross_view"),
        ("--seed", "2"),
        ("--output_dir", str(tmp_path / "run")),
    ):
        assert flags[flags.index(name) + 1] == value
    assert flags[-2:] == ["--epochs", "1"]  # the user's extra flags come last, so they win


def _fake_scores(monkeypatch) -> list[Path]:
    calls: list[Path] = []

    def fake_score(path, args, cache, dense_miou=None):
        calls.append(path)
        seed = int(path.parent.name.removeprefix("seed"))
        neighbours = {key: 0.1 * seed + len(calls) for key in ablation.NEIGHBOUR_KEYS}
        return {
            "dense_miou": 50.0 + seed + len(calls) if dense_miou is None else dense_miou,
            **dict.fromkeys(ablation.MECHANISM_KEYS, 0.5),
            "batch_4": neighbours,
        }

    monkeypatch.setattr(ablation, "score", fake_score)
    return calls


def test_scores_are_cached_next_to_the_checkpoint_until_it_the_protocol_or_the_scoring_changes(
    monkeypatch, tmp_path
) -> None:
    calls = _fake_scores(monkeypatch)
    checkpoint = tmp_path / "seed1" / "checkpoint.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    args = ablation.get_args_parser().parse_args([])
    first = ablation.cached_score(checkpoint, args, {})
    assert ablation.cached_score(checkpoint, args, {}) == first and len(calls) == 1
    assert json.loads((checkpoint.parent / "ablation_score.json").read_text())["score"] == first
    other_protocol = ablation.get_args_parser().parse_args(["--num_bank", "64"])
    ablation.cached_score(checkpoint, other_protocol, {})
    assert len(calls) == 2
    stat = checkpoint.stat()
    os.utime(checkpoint, (stat.st_atime, stat.st_mtime + 10))  # a resumed run wrote a new checkpoint
    ablation.cached_score(checkpoint, other_protocol, {})
    assert len(calls) == 3
    third = ablation.cached_score(checkpoint, other_protocol, {})
    monkeypatch.setattr(ablation.mechanism, "SCORING_VERSION", ablation.mechanism.SCORING_VERSION + 1)
    fourth = ablation.cached_score(checkpoint, other_protocol, {})  # the mechanism's numbers changed
    assert len(calls) == 4
    assert fourth["batch_4"] != third["batch_4"]  # rescored ...
    assert fourth["dense_miou"] == third["dense_miou"]  # ... but the dense score, independent of it, kept
    assert json.loads((checkpoint.parent / "ablation_score.json").read_text())["score"] == fourth


def test_skip_training_scores_the_finished_runs_only(monkeypatch, tmp_path, capsys) -> None:
    _fake_scores(monkeypatch)
    monkeypatch.setattr(ablation, "train", lambda *a: pytest.fail("--skip_training must not train"))
    for seed in (0, 2):  # seed 1 never finished
        run = ablation.run_dir(str(tmp_path), "redrawn", "cribo", seed)
        run.mkdir(parents=True)
        (run / "checkpoint.pth").write_bytes(b"weights")
    out = tmp_path / "ablation.json"
    summary = ablation.main(
        [
            "--root",
            str(tmp_path),
            "--views",
            "redrawn",
            "--objectives",
            "cribo",
            "--seeds",
            "0",
            "1",
            "2",
            "--skip_training",
            "--out",
            str(out),
        ]
    )
    assert set(summary["rows"]["redrawn/cribo"]) == {"seed0", "seed2"}
    assert json.loads(out.read_text())["rows"] == summary["rows"]
    printed = capsys.readouterr().out
    assert "52.50 ± 1.50" in printed  # dense NN of seeds 0 and 2 (first and second score): 51 and 54
