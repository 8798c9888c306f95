"""Smoke runs of the benchmark scripts (tiny sizes), their hand-checkable formulas, and the opt-in
activation checkpointing the memory benchmark relies on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (
    bench_clustering,
    bench_data,
    bench_dense_nn,
    bench_photometric,
    bench_retrieval,
    bench_train_step,
    cls_content,
    feature_geometry,
    learning_signal,
    supervised_ceiling,
)
from benchmarks.harness import ROOT, format_table
from cribo_utils.weights.checkpoint_formats import build_pretrained_backbone

SCRIPTS = (
    "bench_train_step",
    "bench_clustering",
    "bench_dense_nn",
    "bench_data",
    "bench_photometric",
    "bench_retrieval",
    "cls_content",
    "feature_geometry",
    "learning_signal",
    "supervised_ceiling",
    "mechanism",
    "ablation",
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_help(name: str) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--out" in completed.stdout


def test_bench_train_step_head_defaults_are_the_head_modules() -> None:
    from models.head import HEAD_HIDDEN_DIM, HEAD_NLAYERS

    repeated = (bench_train_step.HEAD_HIDDEN_DIM, bench_train_step.HEAD_NLAYERS)
    assert repeated == (HEAD_HIDDEN_DIM, HEAD_NLAYERS)
    defaults = bench_train_step.get_parser().parse_args([])
    assert (defaults.head_hidden_dim, defaults.head_nlayers) == (HEAD_HIDDEN_DIM, HEAD_NLAYERS)


def test_backbone_flops_by_hand() -> None:
    # depth 1, D 2, 32 px / patch 16: N = 4 patches, T = 5 tokens.
    # blocks 24*5*2^2 + 4*5^2*2 = 480 + 200; patch embedding 2 * 4 * (3 * 16^2) * 2 = 12288.
    assert bench_train_step.backbone_forward_flops(2, 1, 32, 16) == 480 + 200 + 12288
    # ViT-S/16 at 224 px is the well-known 4.6 G multiply-adds, i.e. about 9.2 GFLOPs.
    assert bench_train_step.backbone_forward_flops(384, 12, 224, 16) == pytest.approx(9.2e9, rel=0.02)
    assert bench_train_step.training_step_flops(2, 1, 32, 16, batch_size=3) == 4 * 2 * 3 * 12968


def test_reference_clustering_tensor_size() -> None:
    # docs/differences.md, difference 3: ViT-S ImageNet (B 128, 2N 392, K 32): 629 M elements, 2.5 GB fp32.
    assert bench_clustering.reference_tensor_bytes(128, 196, 32) == 128 * 392 * 392 * 32 * 4 == 2_517_630_976
    assert bench_clustering.parse_config("16x49x8") == (16, 49, 8)
    for bad in ("16x50x8", "16x49", "2x4x9"):
        with pytest.raises(Exception, match="--configs"):
            bench_clustering.parse_config(bad)


def test_random_crop_positions_match_the_data_pipeline_closed_form() -> None:
    from data.augmentations import patch_centre_coordinates

    generator = torch.Generator().manual_seed(3)
    positions = bench_clustering.random_crop_positions(5, 3, 16, generator)
    assert positions.shape == (5, 2, 9)
    generator = torch.Generator().manual_seed(3)  # replay the draws: h, w, top, left, flipped
    draws = [torch.rand(5, 1, generator=generator, dtype=torch.float64) for _ in range(4)]
    flipped = torch.rand(5, 1, generator=generator) < 0.5
    height, width = 120 + 260 * draws[0], 120 + 260 * draws[1]
    top, left = (400 - height) * draws[2], (500 - width) * draws[3]
    assert flipped.any() and not flipped.all()
    for b in range(5):
        expected = patch_centre_coordinates(
            float(top[b]), float(left[b]), float(height[b]), float(width[b]), 48, 16, bool(flipped[b])
        )
        torch.testing.assert_close(positions[b], expected)


def test_format_table_aligns_columns() -> None:
    table = format_table(["a", "bb"], [[1.23456, None], ["xyz", 1234.5]], title="t")
    lines = table.splitlines()
    assert lines[0] == "t" and len({len(line) for line in lines[1:]}) == 1
    assert "1.23" in table and "1234" in table and " - " in table


# One timed step of a 32 px ViT-Tiny on 2 images: the smallest train-step benchmark that runs every section.
TINY_TRAIN_STEP = [
    *("--image_size", "32", "--batch_size", "2", "--n_tokens", "2", "--queue_size", "4", "--out_dim", "32"),
    *("--steps", "1", "--n_batches", "1", "--scene_size", "48", "--threads", "1"),
]


def test_bench_train_step_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    bench_train_step.main([*TINY_TRAIN_STEP, "--warmup", "1", "--in_process", "--out", str(out)])
    result = json.loads(out.read_text())["results"][0]
    full, bare = result["full"], result["bare"]
    assert set(full["sections_median_s"]) == {key for key, _ in bench_train_step.SECTIONS}
    bare_sections = {
        "data",
        "augment",  # --augment_on device (the default): the photometric stages, in both steps
        "teacher_forward",
        "teacher_heads",
        "student_forward",
        "loss",
        "backward",
        "optimizer",
    }
    assert set(bare["sections_median_s"]) == bare_sections
    assert full["nn_active"] == 1.0 and full["bank_images"] == 4  # retrieval ran over a full bank
    assert result["overhead_ratio"] == pytest.approx(full["median_step_s"] / bare["median_step_s"])
    (pair_ratio,) = result["pair_ratios"]  # one timed pair (after one warm-up pair)
    assert pair_ratio == pytest.approx(full["step_seconds"][0] / bare["step_seconds"][0])
    (cpu_ratio,) = result["pair_cpu_ratios"]  # CPU time of the process's threads, same pair
    assert cpu_ratio == pytest.approx(full["step_cpu_seconds"][0] / bare["step_cpu_seconds"][0])
    assert result["overhead_ratio_cpu_time"] == pytest.approx(cpu_ratio) and cpu_ratio > 0
    assert full["peak_rss_process_modes"] == ["full", "bare"]
    assert full["peak_rss_bytes"] > 0 and full["data_pipeline_s_per_batch"] > 0
    # one more (untimed) step of each kind under the operator counter
    assert full["op_counts"]["total_ops"] > bare["op_counts"]["total_ops"] > 0
    assert result["method_op_counts"]["kernels"]["clustering"] > 0


def test_bench_train_step_counts_operators_and_the_method_part_does_not_depend_on_depth(
    tmp_path: Path,
) -> None:
    """--count_only counts one step of each kind per section; the full-minus-bare difference (the method's
    own operators) is the same for 1 and 2 blocks, while the backbone sections grow with --depth."""
    results = {}
    for depth in (1, 2):
        out = tmp_path / f"counts_{depth}.json"
        argv = [*TINY_TRAIN_STEP, "--depth", str(depth), "--count_only", "--in_process", "--out", str(out)]
        bench_train_step.main(argv)
        results[depth] = json.loads(out.read_text())["results"][0]
    for result in results.values():
        full, bare, method = result["full"], result["bare"], result["method_op_counts"]
        assert full["nn_active"] == 1.0 and "sections_median_s" not in full  # no timings
        assert full["total_kernels"] == sum(full["kernels"].values()) < full["total_ops"]
        assert {"clustering", "memory_bank", "ema"} <= set(full["ops"]) and "clustering" not in bare["ops"]
        assert method["kernels"]["clustering"] == full["kernels"]["clustering"] > 0
        assert method["total_kernels"] == sum(
            value for section, value in method["kernels"].items() if section != "optimizer"
        )
    assert results[1]["method_op_counts"] == results[2]["method_op_counts"]
    # The method's one wait for the device the counter sees: the nonzero that reads the number of objects
    # (the bank's counts and the metrics are read with .tolist(), invisible on the CPU). The photometric
    # augmentation's own reads are the data pipeline's.
    syncs = {section: n for section, n in results[1]["full"]["syncs"].items() if section != "augment"}
    assert syncs == {"clustering": 1}
    assert results[1]["full"]["sync_operators"]["clustering"] == {"aten.nonzero": 1}
    assert results[2]["bare"]["kernels"]["teacher_forward"] > results[1]["bare"]["kernels"]["teacher_forward"]


def test_method_op_counts_by_hand() -> None:
    full = {
        "ops": {"clustering": 10, "loss": 7, "optimizer": 5},
        "kernels": {"clustering": 8, "loss": 6, "optimizer": 5},
        "syncs": {"loss": 1},
    }
    bare = {"ops": {"loss": 4, "optimizer": 3}, "kernels": {"loss": 4, "optimizer": 3}, "syncs": {}}
    method = bench_train_step.method_op_counts(full, bare)
    assert method["ops"] == {"clustering": 10, "loss": 3, "optimizer": 2}
    assert method["kernels"] == {"clustering": 8, "loss": 2, "optimizer": 2}
    assert method["syncs"] == {"loss": 1}
    assert (method["total_ops"], method["total_kernels"], method["total_syncs"]) == (13, 10, 1)


def test_bench_train_step_imagenet_like_source_times_both_pipelines(tmp_path: Path) -> None:
    """--source imagenet_like decodes 500 x 375 JPEGs; both pipelines give data wall and CPU seconds."""
    out = tmp_path / "train_step.json"
    argv = [*TINY_TRAIN_STEP, "--warmup", "0", "--in_process", "--source", "imagenet_like"]
    bench_train_step.main([*argv, "--augment_on", "workers", "device", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["config"]["augment_on"] for r in results] == ["workers", "device"]
    for result in results:
        assert result["config"]["source"] == "imagenet_like"
        full = result["full"]
        assert full["data_pipeline_s_per_batch"] > 0 and full["data_pipeline_cpu_s_per_batch"] > 0


def test_bench_train_step_bare_alone_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    bench_train_step.main([*TINY_TRAIN_STEP, "--warmup", "0", "--modes", "bare", "--out", str(out)])
    result = json.loads(out.read_text())["results"][0]
    assert result["full"] is None and "overhead_ratio" not in result and "pair_ratios" not in result
    assert result["bare"]["peak_rss_process_modes"] == ["bare"]  # measured in its own process
    assert result["bare"]["peak_rss_by_stage_bytes"]["import"] > 0
    assert "reference_step_s" not in result  # 32 px has no reference figure


def test_bench_clustering_smoke(tmp_path: Path) -> None:
    out = tmp_path / "clustering.json"
    bench_clustering.main(
        ["--configs", "2x4x2", "--dim", "8", "--repeats", "1", "--threads", "1", "--out", str(out)]
    )
    (result,) = json.loads(out.read_text())["results"]
    assert result["reference_tensor_bytes"] == 2 * 8 * 8 * 2 * 4
    assert result["median_s"] > 0 and result["peak_extra_measure"] == "ru_maxrss delta"
    assert 0 < result["valid_clusters_per_image"] <= 2


def test_bench_data_smoke(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    bench_data.main(
        [
            "--sources",
            "imagenet_like",
            "synthetic",
            "jpeg",
            "--jpeg_size",
            "60",
            "40",
            "--image_sizes",
            "32",
            "--n_images",
            "4",
            "--batch_size",
            "2",
            "--scene_size",
            "48",
            "--loader_workers",
            "0",
            "--in_process",
            "--out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert [(r["config"]["source"], r["config"]["augment_on"]) for r in results] == [
        (source, augment_on)
        for source in ("imagenet_like", "synthetic", "jpeg")
        for augment_on in ("workers", "device")
    ]
    assert payload["jpeg_export_seconds"] > 0 and payload["imagenet_like_mean_file_bytes"] > 0
    for result in results:
        expected_size = [60, 40] if result["config"]["source"] == "imagenet_like" else [48, 48]
        assert result["source_image_size"] == expected_size
        assert set(result["cpu_ms_per_image"]) == set(bench_data.STAGES)
        assert result["end_to_end_images_per_s"] > 0 and result["loader"][0]["images_per_s"] > 0
    # Two 32 px views: float32 (workers) or uint8 plus 13 parameters (device), and 2 x 2 x 4 coordinates.
    by_pipeline = {r["config"]["augment_on"]: r["bytes_per_image_to_device"] for r in results[:2]}
    assert by_pipeline == {"workers": 2 * 3 * 32 * 32 * 4 + 64, "device": 2 * 3 * 32 * 32 + 64 + 2 * 13 * 4}


def test_bench_photometric_smoke(tmp_path: Path) -> None:
    out = tmp_path / "photometric.json"
    bench_photometric.main(
        ["--batch_size", "2", "--image_size", "32", "--repeats", "1", "--in_process", "--out", str(out)]
    )
    results = json.loads(out.read_text())["results"]
    assert [r["config"]["implementation"] for r in results] == list(bench_photometric.IMPLEMENTATIONS)
    assert all(r["seconds_per_batch"] > 0 for r in results if "skipped" not in r)


def test_natural_image_has_a_power_law_spectrum() -> None:
    import numpy as np

    image = bench_data.natural_image(np.random.default_rng(0), 120, 160).astype(float).mean(-1)
    spectrum = np.abs(np.fft.rfft2(image - image.mean()))
    freq = np.hypot(np.fft.fftfreq(120)[:, None], np.fft.rfftfreq(160)[None])
    low, high = spectrum[(freq > 0.02) & (freq < 0.05)].mean(), spectrum[(freq > 0.2) & (freq < 0.4)].mean()
    assert low > 5 * high  # amplitude falls with frequency, as in photographs (white noise: ratio ~1)


def test_bench_dense_nn_smoke_and_skip(tmp_path: Path) -> None:
    out = tmp_path / "dense.json"
    bench_dense_nn.main(
        [
            "--arch",
            "vit_tiny",
            "--input_size",
            "32",
            "--n_train",
            "2",
            "--n_val",
            "1",
            "--batch_size",
            "2",
            "--scene_size",
            "48",
            "--memory_sizes",
            "300",
            "10000000000",
            "--k",
            "3",
            "--threads",
            "1",
            "--in_process",
            "--out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    pipeline, *indexes = payload["results"]
    assert pipeline["memory_entries"] == 2 * 4  # 2 images x 1 pass x (32/16)^2 patches, all kept
    assert pipeline["images_per_s"]["memory: whole build (extract + index add)"] > 0
    # Both backends side by side, for one and two processes (each holding half of the 300 rows).
    assert [(r["config"]["index"], r["world_size"], r["rows_per_process"]) for r in indexes] == [
        ("torch", 1, 300),
        ("exact", 1, 300),
        ("torch", 2, 150),
        ("exact", 2, 150),
    ]
    for index in indexes:
        assert index["memory_size"] == 300 and index["search_queries"] == 4 and index["found_all"]
        assert index["index_bytes_per_process"] == index["rows_per_process"] * 192 * 4
        assert index["search_queries_per_s"] > 0 and index["peak_rss_bytes"] > 0
    assert [s["world_size"] for s in payload["skipped"]] == [1, 2]
    assert all(s["memory_size"] == 10_000_000_000 and "GB" in s["reason"] for s in payload["skipped"])


def test_bench_retrieval_smoke(tmp_path: Path) -> None:
    out = tmp_path / "retrieval.json"
    bench_retrieval.main(
        [
            "--queue_sizes",
            "4",
            "--n_tokens",
            "2",
            "--dim",
            "8",
            "--objects",
            "3",
            "--chunk_size",
            "3",
            "--push_images",
            "2",
            "--repeats",
            "1",
            "--in_process",
            "--out",
            str(out),
        ]
    )
    (result,) = json.loads(out.read_text())["results"]
    assert result["bank_objects"] == 8 and result["similarity_block_bytes"] == 3 * 3 * 4
    assert result["median_s"] > 0


def test_grad_checkpointing_gives_identical_outputs_and_gradients() -> None:
    """The memory option of VisionTransformer: recomputing the blocks (drop path included) changes nothing."""
    from models import build_backbone

    torch.manual_seed(0)
    plain = build_backbone("vit_tiny", drop_path_rate=0.5, img_size=32, depth=2).train()
    recomputed = build_backbone("vit_tiny", drop_path_rate=0.5, img_size=32, depth=2).train()
    recomputed.load_state_dict(plain.state_dict())
    recomputed.set_grad_checkpointing(True)
    images = torch.randn(4, 3, 32, 32)
    outputs = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # same drop-path draws in both forwards
        cls, patches = model.forward_features(images)
        (cls.square().sum() + patches.sin().sum()).backward()
        outputs.append((cls.detach(), patches.detach()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    # Drop path was active (so the replayed draws were checked): the eval-mode output differs.
    with torch.no_grad():
        assert not torch.allclose(plain.eval().forward_features(images)[0], outputs[0][0])


def test_cls_content_explained_variance_by_hand() -> None:
    generator = torch.Generator().manual_seed(0)
    regressor = torch.randn(500, 2, generator=generator)
    exact = regressor @ torch.randn(2, 8, generator=generator) + 3.0
    assert cls_content.explained_variance(exact, regressor) == pytest.approx(1.0, abs=1e-9)
    # Half the variance in the regressor's direction, half in an orthogonal noise direction.
    signal, noise = torch.randn(500, 1, generator=generator), torch.randn(500, 1, generator=generator)
    tokens = torch.cat([signal, noise], dim=1)
    assert cls_content.explained_variance(tokens, signal) == pytest.approx(
        float(signal.var() / (signal.var() + noise.var())), abs=0.02
    )
    one_hot = torch.nn.functional.one_hot(torch.arange(500) % 5).float()
    chance = cls_content.explained_variance(torch.randn(500, 64, generator=generator), one_hot)
    assert chance == pytest.approx(4 / 500, abs=0.006)  # (levels - 1) / n for noise


def test_cls_content_reads_the_scene_properties(tmp_path: Path) -> None:
    images, properties = cls_content.validation_scenes(12, seed=0, level="easy", image_size=32)
    assert images.shape == (12, 3, 32, 32)
    widths = {"label": 4, "count": 3, "area": 1, "background_colour": 6, "outline": 6, "centroid": 2}
    for name, width in widths.items():
        assert properties[name].shape == (12, width), name
    assert torch.all(properties["label"].sum(1) == 1) and torch.all(properties["count"].sum(1) == 1)
    assert torch.all((properties["area"] > 0) & (properties["area"] < 1))
    summary = cls_content.main(
        ["--num_images", "12", "--input_size", "32", "--out", str(tmp_path / "c.json")]
    )
    assert set(summary["r2"]) == {"chance (random tokens)", "random init 0"}
    assert all(0.0 <= value <= 1.0 + 1e-9 for row in summary["r2"].values() for value in row.values())


def test_feature_geometry_measures_by_hand() -> None:
    torch.manual_seed(0)
    line = torch.randn(50, 1) * torch.randn(1, 8)  # every row on one line through the origin
    assert feature_geometry.effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    axes = torch.linalg.qr(torch.randn(8, 8))[0]
    isotropic = torch.cat([axes, -axes]).repeat(20, 1)  # zero mean, equal variance along 8 axes
    assert feature_geometry.effective_rank(isotropic) == pytest.approx(8.0, rel=1e-3)
    groups = torch.arange(40) % 4
    per_group = torch.randn(4, 8)[groups]  # features constant within each group
    assert feature_geometry.explained_variance(per_group, groups) == pytest.approx(1.0)
    noise = torch.randn(4000, 8)
    assert feature_geometry.explained_variance(noise, torch.arange(4000) % 4) < 0.01


def test_feature_geometry_oracle_features_retrieve_every_grouping_perfectly() -> None:
    """One-hot features of the true class: every patch's neighbours share its class, mIoU 100 everywhere."""
    args = feature_geometry.get_args_parser().parse_args(["--num_neighbours", "3"])
    memory_labels = torch.arange(13).repeat(5)
    query_labels = torch.arange(13).repeat(2)
    memory = torch.nn.functional.one_hot(memory_labels, 13).float()
    queries = torch.nn.functional.one_hot(query_labels, 13).float()
    scores = feature_geometry.retrieval_miou(memory, memory_labels, queries, query_labels, args)
    assert scores == {name: pytest.approx(100.0) for name in feature_geometry.GROUPINGS}
    # Texture grouping: classes 1-6 are checkered, 7-12 striped.
    groups = feature_geometry.label_groups(torch.tensor([0, 1, 6, 7, 12]))
    assert groups["texture"].tolist() == [0, 1, 1, 2, 2]
    assert groups["shape"].tolist() == [0, 1, 6, 1, 6]


def test_feature_geometry_smoke(tmp_path: Path) -> None:
    out = tmp_path / "geometry.json"
    summary = feature_geometry.main(
        ["--depth", "1", "--random_seeds", "1", "--num_train", "4", "--num_val", "2", "--input_size", "32"]
        + ["--object_colours", "fixed", "--out", str(out)]
    )
    assert json.loads(out.read_text())["rows"][1]["network"] == "random init, seed 0"
    assert 1.0 <= summary["rows"][1]["effective_rank"] <= 192
    assert 0.0 <= summary["rows"][1]["retrieval_fg"] <= 100.0


def test_supervised_ceiling_schedule_and_saved_backbone(tmp_path: Path) -> None:
    args = supervised_ceiling.get_args_parser().parse_args(["--iterations", "10", "--warmup_iterations", "4"])
    rates = [supervised_ceiling.learning_rate(i, args) for i in range(10)]
    assert rates[0] == pytest.approx(1e-3 * 0.25)  # warm-up: (i + 1) / 4, cosine factor 1 at i = 0
    assert rates[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 10)))
    assert all(a >= b for a, b in zip(rates[3:], rates[4:], strict=False))  # decays after the warm-up

    out = tmp_path / "backbone.pth"
    flags = ["--input_size", "32", "--depth", "1", "--num_train", "8", "--batch_size", "8"]
    summary = supervised_ceiling.main([*flags, "--iterations", "40", "--lr", "3e-3", "--out", str(out)])
    assert summary["last_loss"] < 0.8 * summary["first_loss"]  # the per-patch classifier learns
    backbone = build_pretrained_backbone("vit_tiny", 16, str(out))  # strict load of the bare state dict
    saved = torch.load(out, weights_only=True)
    torch.testing.assert_close(backbone.pos_embed, saved["pos_embed"])


def test_supervised_ceiling_full_crops_keep_the_layout_up_to_a_flip() -> None:
    args = supervised_ceiling.get_args_parser().parse_args(["--input_size", "64", "--crop_scale", "1", "1"])
    masks = torch.zeros(6, 128, 128, dtype=torch.uint8)
    masks[:, :, :64], masks[:, :, 64:] = 1, 2  # left half class 1, right half class 2
    images = masks[:, None].float().expand(-1, 3, -1, -1).contiguous()
    crops, labels = supervised_ceiling.random_crops(images, masks, args, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 64, 64) and labels.shape == (6, 4, 4)
    left_right = torch.tensor([1, 1, 2, 2]).expand(4, 4)
    for crop, label in zip(crops, labels, strict=True):
        flipped = bool(label[0, 0] == 2)
        assert torch.equal(label, left_right.flip(-1) if flipped else left_right)
        torch.testing.assert_close(
            crop[0], label.repeat_interleave(16, 0).repeat_interleave(16, 1).float(), atol=0.5, rtol=0
        )
    assert {bool(label[0, 0] == 2) for label in labels} == {False, True}  # both orientations occur


def test_learning_signal_averages_dense_nn_over_memory_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []
    dense_miou_by_seed = {"0": 0.10, "1": 0.12, "2": 0.17}

    def fake_run_eval(script, weights_flags, args, extra):
        calls.append((script, extra))
        if script == "eval_dense_nn.py":
            return {"miou": dense_miou_by_seed[extra[extra.index("--seed") + 1]]}
        if script == "eval_knn.py":
            return {"results": {"20": {"top1": 40.0}}}
        return {"last_top1": 30.0}

    monkeypatch.setattr(learning_signal, "run_eval", fake_run_eval)
    args = learning_signal.get_args_parser().parse_args(["--memory_seeds", "3"])
    scores = learning_signal.evaluate(["--init_seed", "0"], args)
    assert scores["dense_miou"] == pytest.approx(100 * (0.10 + 0.12 + 0.17) / 3)
    assert (scores["knn_top1"], scores["linear_top1"]) == (40.0, 30.0)
    dense_calls = [extra for script, extra in calls if script == "eval_dense_nn.py"]
    dense_seeds = [extra[extra.index("--seed") + 1] for extra in dense_calls]
    assert dense_seeds == ["0", "1", "2"]
    # dense NN queries the first --num_val scenes; the [CLS] probes validate on --num_val_cls of them
    num_val = {script: extra[extra.index("--synthetic_num_val") + 1] for script, extra in calls}
    assert num_val == {"eval_dense_nn.py": "300", "eval_knn.py": "2000", "eval_linear.py": "2000"}
