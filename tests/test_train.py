"""End-to-end training: launcher outputs, exact resume, 2-process torchrun, released-checkpoint seeding."""

import argparse
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import main_cribo
from cribo_utils.checkpoint import without_prefix

TINY = [
    "--depth",
    "1",
    "--image_size",
    "32",
    "--patch_size",
    "16",
    "--n_tokens",
    "2",
    "--out_dim",
    "32",
    "--out_dim_c",
    "32",
    "--batch_size_per_gpu",
    "4",
    "--queue_size",
    "8",
    "--synthetic_num_train",
    "16",
    "--synthetic_image_size",
    "48",
    "--num_workers",
    "0",
    "--epochs",
    "2",
    "--log_freq",
    "1",
    "--warmup_epochs",
    "1",
    "--saveckp_freq",
    "1",
]


def run(tmp_path, *extra):
    return main_cribo.main(["--output_dir", str(tmp_path), *TINY, *extra])


def test_default_launcher_writes_checkpoint_log_and_args(tmp_path):
    metrics = run(tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    for key in (
        "student",
        "teacher",
        "optimizer",
        "epoch",
        "args",
        "dino_loss",
        "centroids_queue_cpu",
        "cpv_queue_cpu",
        "format_version",
    ):
        assert key in checkpoint, key
    assert all(
        key.startswith("module.backbone.") or key.startswith("module.head.") for key in checkpoint["student"]
    )
    assert all(key.startswith(("backbone.", "head.")) for key in checkpoint["teacher"])
    assert {"head.last_layer.weight_g", "head.last_layer_c.weight_v"} <= set(checkpoint["teacher"])
    assert checkpoint["epoch"] == 2 and checkpoint["iteration"] == 8
    assert checkpoint["centroids_queue_cpu"].shape == (2, 2 * 8, 192)
    assert (tmp_path / "checkpoint0001.pth").exists() and (tmp_path / "checkpoint.pth.backup").exists()
    records = [json.loads(line) for line in open(tmp_path / "log.txt")]
    step_records = [r for r in records if "loss" in r]
    assert len(step_records) == 8
    for key in (
        "loss",
        "loss_img",
        "loss_obj",
        "loss_nn",
        "lr",
        "wd",
        "momentum",
        "clusters_per_image",
        "nn_fraction",
        "images_per_s",
    ):
        assert key in step_records[0], key
    epoch_records = [r for r in records if "epoch_loss" in r]
    assert [r["epoch"] for r in epoch_records] == [0, 1]
    assert epoch_records[0]["epoch_loss_nn"] == 0.0  # the cross-image loss is off in epoch 0
    assert epoch_records[1]["epoch_nn_active"] > 0  # and on once the bank is full in epoch 1
    assert json.load(open(tmp_path / "args.json"))["depth"] == 1
    assert metrics["loss"] > 0


def _final_state(path):
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint


@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_resume_is_exact_mid_epoch(tmp_path, augment_on):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flag = ("--augment_on", augment_on)
    run(straight, "--max_iters", "6", *flag)
    run(resumed, "--max_iters", "3", "--saveckp_freq_iters", "1", *flag)
    first = torch.load(resumed / "checkpoint.pth", weights_only=True)
    assert first["iteration"] == 3 and first["epoch"] == 0  # stopped mid-epoch (4 iterations per epoch)
    assert first["args"]["augment_on"] == augment_on
    run(resumed, "--max_iters", "6", *flag)
    a = _final_state(straight / "checkpoint.pth")
    b = _final_state(resumed / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == 6
    for key in ("student", "teacher"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=1e-6, rtol=0, msg=f"{key}.{name}")
    for name in ("center", "center_c"):
        torch.testing.assert_close(a["dino_loss"][name], b["dino_loss"][name], atol=1e-6, rtol=0)
    torch.testing.assert_close(a["centroids_queue_cpu"], b["centroids_queue_cpu"], atol=1e-6, rtol=0)
    assert torch.equal(a["cpv_queue_cpu"], b["cpv_queue_cpu"])


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_keep_ranks_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "main_cribo.py",
        "--output_dir",
        str(tmp_path),
        *TINY,
        "--batch_size_per_gpu",
        "2",
    ]
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digests = []
    for rank in (0, 1):
        text = open(tmp_path / "logs" / f"rank{rank}.log").read()
        match = re.search(rf"final state digest \(rank {rank}\): (\{{.*\}})", text)
        assert match, f"rank {rank} did not finish"
        digests.append(json.loads(match.group(1)))
    assert digests[0] == digests[1]  # teacher weights, centres and memory bank identical across ranks
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["args"]["batch_size_per_gpu"] == 2
    assert int(checkpoint["cpv_queue_cpu"].gt(0).sum()) > 0


def test_start_checkpoint_path_seeds_from_released_layout(tmp_path):
    source = tmp_path / "source"
    run(source, "--max_iters", "1")
    ours = torch.load(source / "checkpoint.pth", weights_only=True)
    released = {  # the released layout: an argparse.Namespace under `args`, bare teacher keys
        "student": ours["student"],
        "teacher": ours["teacher"],
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny"),
        "dino_loss": ours["dino_loss"],
    }
    torch.save(released, tmp_path / "released.pth")
    target = tmp_path / "target"
    run(target, "--max_iters", "1", "--start_checkpoint_path", str(tmp_path / "released.pth"), "--lr", "0")
    seeded = torch.load(target / "checkpoint.pth", weights_only=True)
    # with lr 0 the student is unchanged, so it must equal the released student
    for name, value in without_prefix(ours["student"], "module.").items():
        torch.testing.assert_close(without_prefix(seeded["student"], "module.")[name], value)


def test_device_and_worker_pipelines_train_on_equivalent_views(tmp_path):
    """Same seed: the two pipelines see the same crops and photometric parameters, so the first losses
    agree closely (the pixels differ only by PIL's rounding), while the trained weights are not identical."""
    records = {}
    for augment_on in ("device", "workers"):
        run(tmp_path / augment_on, "--max_iters", "2", "--augment_on", augment_on)
        lines = (tmp_path / augment_on / "log.txt").read_text().splitlines()
        records[augment_on] = [json.loads(line) for line in lines if '"loss"' in line]
    first_device, first_workers = records["device"][0], records["workers"][0]
    assert first_device["loss"] == pytest.approx(first_workers["loss"], rel=0.02)
    assert first_device["loss"] != first_workers["loss"]


def test_grad_checkpointing_flag_trains_the_same_weights(tmp_path):
    """--grad_checkpointing only trades memory for recomputation: the trained weights are unchanged."""
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    run(plain, "--max_iters", "3")
    run(recomputed, "--max_iters", "3", "--grad_checkpointing", "true")
    a = torch.load(plain / "checkpoint.pth", weights_only=True)
    b = torch.load(recomputed / "checkpoint.pth", weights_only=True)
    assert b["args"]["grad_checkpointing"] is True
    for name in a["student"]:
        torch.testing.assert_close(a["student"][name], b["student"][name], atol=1e-5, rtol=1e-4, msg=name)
