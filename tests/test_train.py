"""End-to-end training: launcher outputs, exact resume, 2-process torchrun, released-checkpoint seeding;
when the cross-image loss starts and what the start-up log says."""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch

import main_cribo
from cribo_utils import train
from cribo_utils.method.memory_bank import CentroidMemoryBank
from cribo_utils.train.checkpoint import CheckpointError, without_prefix
from cribo_utils.train.parser import ConfigError
from cribo_utils.weights.errors import CheckpointFormatError

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
    step_records = [json.loads(line) for line in open(tmp_path / "log_iterations.txt")]
    assert len(step_records) == 8 and all("loss" in r for r in step_records)
    # log.txt is DINO's: one record per epoch and nothing else, so a DINO plotting script reads every line
    records = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert len(records) == 2 and all("train_loss" in r and "loss" not in r for r in records)
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
    epoch_records = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epoch_records] == [0, 1]
    for key in ("train_loss", "train_lr", "train_wd", "train_loss_img", "train_loss_obj", "train_momentum"):
        assert key in epoch_records[0], key  # DINO's keys, and every term
    lrs = [r["lr"] for r in step_records[:4]]  # epoch 0's iterations (--log_freq 1)
    assert epoch_records[0]["train_lr"] == pytest.approx(sum(lrs) / len(lrs))
    assert epoch_records[0]["train_loss_nn"] == 0.0  # the cross-image loss is off in epoch 0
    assert epoch_records[1]["train_nn_active"] > 0  # and on once the bank is full in epoch 1
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
@pytest.mark.parametrize("local_crops", ["0", "1"])
def test_torchrun_two_processes_keep_ranks_identical(tmp_path, local_crops):
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
        "--local_crops_number",
        local_crops,
        "--local_crops_size",
        "16",
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


def test_init_backbone_loads_both_backbones_and_leaves_the_heads_fresh(tmp_path):
    source = tmp_path / "source"
    run(source, "--max_iters", "2", "--lr", "0.01")
    fresh = tmp_path / "fresh"
    run(fresh, "--max_iters", "1", "--lr", "0")
    target = tmp_path / "target"
    run(target, "--max_iters", "1", "--lr", "0", "--init_backbone", str(source / "teacher_backbone.pth"))
    backbone = torch.load(source / "teacher_backbone.pth", weights_only=True)
    seeded = torch.load(target / "checkpoint.pth", weights_only=True)
    untouched = torch.load(fresh / "checkpoint.pth", weights_only=True)
    for network in ("student", "teacher"):  # lr 0 and momentum: both backbones still equal the file's
        weights = without_prefix(seeded[network], "module.")
        assert any(name.startswith("head.") for name in weights)
        for name, value in weights.items():
            if name.startswith("backbone."):
                torch.testing.assert_close(value, backbone[name.removeprefix("backbone.")])
            else:  # the heads are those of a fresh run of the same seed
                torch.testing.assert_close(value, without_prefix(untouched[network], "module.")[name])
    key = "backbone.pos_embed"
    assert not torch.equal(seeded["teacher"][key], untouched["teacher"][key])  # the file's, not a fresh draw


def test_init_backbone_errors_name_the_flag_and_the_file(tmp_path):
    with pytest.raises(SystemExit, match="give one of them"):
        run(tmp_path / "both", "--init_backbone", "a.pth", "--start_checkpoint_path", "b.pth")
    with pytest.raises(CheckpointFormatError, match="--init_backbone .*missing.pth"):
        run(tmp_path / "missing", "--max_iters", "1", "--init_backbone", str(tmp_path / "missing.pth"))


def test_device_and_worker_pipelines_train_on_equivalent_views(tmp_path):
    """Same seed: the two pipelines see the same crops and photometric parameters, so the first losses
    agree closely (the pixels differ only by PIL's rounding), while the trained weights are not identical."""
    records = {}
    for augment_on in ("device", "workers"):
        run(tmp_path / augment_on, "--max_iters", "2", "--augment_on", augment_on)
        lines = (tmp_path / augment_on / "log_iterations.txt").read_text().splitlines()
        records[augment_on] = [json.loads(line) for line in lines if '"loss"' in line]
    first_device, first_workers = records["device"][0], records["workers"][0]
    assert first_device["loss"] == pytest.approx(first_workers["loss"], rel=0.02)
    assert first_device["loss"] != first_workers["loss"]


@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_local_crops_enter_only_the_image_level_loss(tmp_path, augment_on):
    """--local_crops_number: the global views, clusters and object loss of the first step are those of the
    two-crop run (local crops are drawn after the global views), the image-level loss is not."""
    records = {}
    for crops in ("0", "2"):
        out = tmp_path / crops
        flags = ["--local_crops_number", crops, "--local_crops_size", "16", "--augment_on", augment_on]
        run(out, "--max_iters", "1", *flags)
        records[crops] = next(
            json.loads(line) for line in open(out / "log_iterations.txt") if '"loss"' in line
        )
    assert records["2"]["loss_obj"] == records["0"]["loss_obj"]
    assert records["2"]["clusters_per_image"] == records["0"]["clusters_per_image"]
    assert records["2"]["loss_img"] != records["0"]["loss_img"]


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


@pytest.mark.slow
def test_compile_flag_trains_the_same_weights_up_to_round_off(tmp_path):
    """--compile (torch.compile of the backbones' forward passes and the clustering rounds; about a minute of
    compilation on 2 CPU cores) trains the same weights as eager up to float round-off, through the NN loss
    (iterations 5 and 6), with the same checkpoint keys."""
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    run(plain, "--max_iters", "6")
    run(compiled, "--max_iters", "6", "--compile", "true")
    a = torch.load(plain / "checkpoint.pth", weights_only=True)
    b = torch.load(compiled / "checkpoint.pth", weights_only=True)
    assert b["args"]["compile"] is True and a["args"]["compile"] is False
    assert list(a["student"]) == list(b["student"]) and list(a["teacher"]) == list(b["teacher"])
    for name in a["student"]:
        torch.testing.assert_close(a["student"][name], b["student"][name], atol=1e-4, rtol=1e-3, msg=name)
    assert torch.equal(a["cpv_queue_cpu"], b["cpv_queue_cpu"])  # the same objects per image


# --------------------------------------------------------------------------------------------------
# The cross-image NN loss starts once the bank has filled, and the log says when (issue 15)


@pytest.mark.parametrize(
    "queue_size, global_batch, iters_per_epoch, epochs",
    [(25000, 128, 39, 6), (24, 4, 4, 3), (8, 4, 4, 2), (1000, 128, 3, 4)],
)
def test_nn_loss_starts_at_the_predicted_iteration_whenever_the_bank_fills(
    queue_size, global_batch, iters_per_epoch, epochs
):
    """The first iteration with nn_loss_active True (pushing real batches into a real bank, as the loop
    does: retrieval before the push) is nn_loss_start_iteration; with 5k images per epoch and the default
    25,000-image queue that is in epoch 5 (the issue's 3-epoch run never gets there)."""
    bank = CentroidMemoryBank(queue_size, 4, 8)
    parts = types.SimpleNamespace(bank=bank, args=argparse.Namespace(objective="cribo"))
    first_active = None
    for iteration in range(epochs * iters_per_epoch):
        if first_active is None and train.nn_loss_active(parts, iteration // iters_per_epoch):
            first_active = iteration
        objects = torch.randn(2 * global_batch, 8)
        bank.push(objects, objects, torch.full((global_batch,), 2))
    assert first_active == train.nn_loss_start_iteration(queue_size, global_batch, iters_per_epoch)
    if queue_size == 25000:
        assert first_active == 196 and first_active // iters_per_epoch == 5


def _args(**values):
    defaults = {"batch_size_per_gpu": 4, "queue_size": 24, "epochs": 3, "max_iters": 0, "objective": "cribo"}
    return argparse.Namespace(**{**defaults, **values})


def test_queue_the_schedule_never_fills_is_refused_at_start_up(tmp_path):
    # 2 epochs x 4 iterations x 4 images: 28 images are in the bank before the last iteration, 32 in all
    with pytest.raises(ConfigError, match="--queue_size 32 is more than the 28 images") as error:
        run(tmp_path, "--queue_size", "32")
    message = str(error.value)
    assert "\n" not in message and "32 in all" in message and "set --queue_size 28 or less" in message
    assert not (tmp_path / "checkpoint.pth").exists()
    train.check_nn_loss_can_start(_args(queue_size=28, epochs=2), iters_per_epoch=4, world_size=1)  # last one
    train.check_nn_loss_can_start(_args(queue_size=32, epochs=1), iters_per_epoch=4, world_size=1)  # no NN


def test_start_up_line_warns_when_the_nn_loss_does_not_run():
    line, runs = train.describe_nn_loss_start(_args(max_iters=5), iters_per_epoch=4, world_size=1)
    assert not runs and "on from iteration 7/12" in line and "--max_iters 5" in line
    line, runs = train.describe_nn_loss_start(_args(epochs=1), iters_per_epoch=4, world_size=1)
    assert not runs and "off for the whole run" in line
    line, runs = train.describe_nn_loss_start(
        _args(queue_size=8, world_size=2), iters_per_epoch=4, world_size=2
    )
    assert runs and "on from iteration 5/12 (epoch 2/3)" in line and "1 iteration(s) of 8 images" in line


def test_log_says_when_the_nn_loss_starts_and_whether_it_ran_each_epoch(tmp_path):
    run(tmp_path, "--queue_size", "24", "--epochs", "3")  # full after 6 iterations of 4 images
    records = [json.loads(line) for line in open(tmp_path / "log_iterations.txt")]
    active = [record["nn_active"] for record in records if "loss" in record]
    assert active == [0.0] * 6 + [1.0] * 6  # iterations 1-6 off, 7-12 on
    log = open(tmp_path / "logs" / "rank0.log").read()
    assert "cross-image NN loss: on from iteration 7/12 (epoch 2/3)" in log
    assert re.search(r"epoch 1/3 done: .* \| nn loss off \(the first epoch; bank 16/24 images\)\n", log)
    assert re.search(r"epoch 2/3 done: .* \| nn loss on in 2/4 iterations\n", log)
    assert re.search(r"epoch 3/3 done: .* \| nn loss on in 4/4 iterations\n", log)
    # no dataset named: the preset applies, and the start-up log lists what it changed
    preset_line = next(line for line in log.splitlines() if "preset synthetic_cpu" in line)
    assert "--preset none turns it off" in preset_line and "teacher_temp 0.07 -> 0.01" in preset_line
    assert " epochs " not in preset_line  # set on the command line, not by the preset


def test_released_config_on_one_process_is_noted_at_start_up(tmp_path):
    run(tmp_path, "--config", "checkpoints/vits16-in_args.json", "--dataset_type", "synthetic")
    log = open(tmp_path / "logs" / "rank0.log").read()
    note = next(line for line in log.splitlines() if "--config vits16-in_args.json" in line)
    assert "8 x 128 = global batch 1024" in note and "1 process(es) x 4 = global batch 4" in note
    assert "peak lr 7.81e-06" in note and "--batch_size 1024" in note
    assert "preset none: the synthetic scenes with the reference defaults" in log  # a dataset type is named


@pytest.mark.parametrize("objective", ["cross_view", "image"])
def test_ablation_objectives_never_fill_or_use_the_bank(tmp_path, objective):
    run(tmp_path, "--queue_size", "24", "--epochs", "3", "--objective", objective)
    records = [json.loads(line) for line in open(tmp_path / "log_iterations.txt")]
    steps = [record for record in records if "loss" in record]
    assert len(steps) == 12 and all(r["nn_active"] == 0.0 and r["loss_nn"] == 0.0 for r in steps)
    if objective == "image":  # the object loss is reported but not in the total
        assert all(abs(r["loss"] - r["loss_img"]) < 1e-4 for r in steps)
    else:
        assert all(abs(r["loss"] - r["loss_img"] - r["loss_obj"]) < 1e-4 for r in steps)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert checkpoint["memory_bank_meta"]["num_images"] == 0 and checkpoint["args"]["objective"] == objective
    log = open(tmp_path / "logs" / "rank0.log").read()
    assert f"cross-image NN loss: off, no memory bank (--objective {objective})" in log
    assert log.count(f"| nn loss off (no memory bank, --objective {objective})\n") == 3  # every epoch line


def test_head_widths_are_flags_and_resume_refuses_other_widths(tmp_path):
    widths = ("--head_hidden_dim", "24", "--head_nlayers", "2", "--head_bottleneck_dim", "8")
    run(tmp_path, "--max_iters", "1", *widths)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    trunk = {k: v.shape for k, v in checkpoint["teacher"].items() if k.startswith("head.mlp.")}
    assert trunk == {
        "head.mlp.0.weight": (24, 192),
        "head.mlp.0.bias": (24,),
        "head.mlp.2.weight": (8, 24),
        "head.mlp.2.bias": (8,),
    }
    assert checkpoint["teacher"]["head.last_layer_c.weight_v"].shape == (32, 8)
    assert checkpoint["args"]["head_hidden_dim"] == 24 and checkpoint["args"]["head_nlayers"] == 2
    dino = ("--head_hidden_dim", "2048", "--head_nlayers", "3", "--head_bottleneck_dim", "256")
    message = (
        r"\(--head_hidden_dim 2048, --head_nlayers 3, --head_bottleneck_dim 256\); to resume it, "
        "pass --head_hidden_dim 24 --head_nlayers 2 --head_bottleneck_dim 8; to start afresh"
    )
    with pytest.raises(CheckpointError, match=message):
        run(tmp_path, "--max_iters", "2", *dino)
    run(tmp_path, "--max_iters", "2", *widths)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["iteration"] == 2


def test_a_checkpoint_that_stored_no_head_widths_resumes_only_with_dino_widths(tmp_path):
    run(tmp_path, "--max_iters", "1", "--out_dim", "16", "--out_dim_c", "16", "--head_hidden_dim", "2048")
    path = tmp_path / "checkpoint.pth"
    checkpoint = torch.load(path, weights_only=True)
    for key in ("head_hidden_dim", "head_nlayers", "head_bottleneck_dim"):  # written before the flags existed
        del checkpoint["args"][key]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="pass --head_hidden_dim 2048;"):
        run(tmp_path, "--max_iters", "2", "--out_dim", "16", "--out_dim_c", "16", "--head_hidden_dim", "64")
    with pytest.raises(CheckpointError, match=r"--out_dim 32, --out_dim_c 32.*pass --out_dim 16"):
        run(tmp_path, "--max_iters", "2")


@pytest.mark.parametrize(
    "flag", ["--head_hidden_dim", "--head_nlayers", "--head_bottleneck_dim", "--out_dim_c"]
)
def test_head_widths_below_one_are_refused(tmp_path, flag):
    with pytest.raises(ConfigError, match=f"{flag} 0: must be at least 1"):
        run(tmp_path, flag, "0")


def test_resume_refuses_another_crop_side(tmp_path):  # the positional embedding is stored for it
    run(tmp_path, "--max_iters", "1")
    with pytest.raises(CheckpointError, match=r"\(--image_size 48\); to resume it, pass --image_size 32;"):
        run(tmp_path, "--max_iters", "2", "--image_size", "48")
