"""Never lose a run: exact resume, damaged and half-written checkpoints, bad images, non-finite losses,
impossible configurations and memory estimates, each with the fault injected for real.

Preemption signals are in tests/test_preemption.py, lost processes in tests/test_distributed_faults.py.
"""

import runpy
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main_cribo
from cribo_utils import train
from cribo_utils.runtime.distributed import DistEnv
from cribo_utils.train import resources
from cribo_utils.train.checkpoint import find_resume_checkpoint, save_training_checkpoint
from cribo_utils.train.flag_configs import network_config, run_shape
from cribo_utils.train.parser import ConfigError, resolve_args, validate_args
from data.datasets import ImageFolderDataset
from data.loading import PerSampleSeededDataset
from tests.fixtures_datasets import make_imagefolder, random_image, write_bad_file, write_image
from tests.launch_helpers import REPO, output_of, start, step_records, training_command, wait_for_exit
from tests.test_train import TINY


def run(output_dir, *extra):
    return main_cribo.main(["--output_dir", str(output_dir), *TINY, *extra])


def run_script(monkeypatch, *argv):
    """Run main_cribo.py as ``__main__`` in this process; returns the SystemExit code (a message or int)."""
    monkeypatch.setattr(sys, "argv", ["main_cribo.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "main_cribo.py"), run_name="__main__")
    return info.value.code


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_training_state(a, b, atol=1e-6):
    """Networks, optimiser moments, centres and memory bank of two checkpoints agree within ``atol``."""
    assert a["iteration"] == b["iteration"] and a["epoch"] == b["epoch"]
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=atol, rtol=0, msg=f"{key}.{name}")
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index in state_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(
                state_a[index][name],
                state_b[index][name],
                atol=atol,
                rtol=0,
                msg=f"optimizer state {index}.{name}",
            )
    for name in ("center", "center_c"):
        torch.testing.assert_close(a["dino_loss"][name], b["dino_loss"][name], atol=atol, rtol=0)
    torch.testing.assert_close(a["centroids_queue_cpu"], b["centroids_queue_cpu"], atol=atol, rtol=0)
    assert torch.equal(a["cpv_queue_cpu"], b["cpv_queue_cpu"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 2-epoch run (8 iterations); ``checkpoint0001.pth`` is its state after iteration 4."""
    output_dir = tmp_path_factory.mktemp("straight")
    run(output_dir)
    return output_dir


# --------------------------------------------------------------------------------------------------
# 1. Exact resume
# --------------------------------------------------------------------------------------------------


def test_resume_at_an_epoch_boundary_with_workers_is_exact(tmp_path, straight_run):
    # stop exactly at the end of epoch 0, resume with 2 data-loading workers (the straight run used none)
    run(tmp_path, "--max_iters", "4", "--num_workers", "2")
    first = load(tmp_path / "checkpoint.pth")
    assert first["iteration"] == 4 and first["epoch"] == 1
    assert_same_training_state(first, load(straight_run / "checkpoint0001.pth"))
    run(tmp_path, "--num_workers", "2")
    assert_same_training_state(load(tmp_path / "checkpoint.pth"), load(straight_run / "checkpoint.pth"))


def test_a_resume_that_skipped_the_optimizer_state_would_be_caught(tmp_path, straight_run):
    """The comparison above is sensitive: dropping the Adam moments at the resume changes the result."""
    run(tmp_path, "--max_iters", "4")
    checkpoint = load(tmp_path / "checkpoint.pth")
    checkpoint["optimizer"]["state"] = {}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    run(tmp_path)
    with pytest.raises(AssertionError):
        assert_same_training_state(load(tmp_path / "checkpoint.pth"), load(straight_run / "checkpoint.pth"))


# --------------------------------------------------------------------------------------------------
# 3. Damaged and half-written checkpoints
# --------------------------------------------------------------------------------------------------


def test_truncated_checkpoint_resumes_from_the_backup_exactly(tmp_path, straight_run):
    run(tmp_path, "--max_iters", "2", "--saveckp_freq_iters", "1")  # checkpoint at 2, backup at 1
    latest = tmp_path / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a crash mid-copy
    run(tmp_path, "--max_iters", "4")
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert f"{latest} is damaged" in log and f"resuming from the backup {latest}.backup" in log
    assert f"resumed from {latest}.backup at iteration 1" in log
    assert_same_training_state(load(latest), load(straight_run / "checkpoint0001.pth"))


def test_both_checkpoints_damaged_is_a_clear_error_not_a_restart(tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    (tmp_path / "checkpoint.pth.backup").write_bytes(b"PK\x03\x04 not a zip archive")
    message = run_script(monkeypatch, "--output_dir", str(tmp_path), *TINY)
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("main_cribo.py: error: cannot resume")
    assert f"{tmp_path}/checkpoint.pth:" in message and f"{tmp_path}/checkpoint.pth.backup:" in message
    assert (tmp_path / "checkpoint.pth").read_bytes() == b""  # nothing was overwritten by a fresh start
    assert not step_records(tmp_path)


def test_an_unwritable_output_dir_stops_in_one_line_before_anything_is_built(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = run_script(monkeypatch, "--output_dir", str(blocker / "run"), *TINY)
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"--output_dir {blocker / 'run'}: cannot write there")  # a ConfigError's line


SLOW_SAVER = r"""
import sys, time
import torch
from cribo_utils.train.checkpoint import save_training_checkpoint

real_save = torch.save


class SlowFile:
    '''A file whose writes take 2 ms each: a slow disk, so the parent can kill us mid-write.'''

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        time.sleep(0.002)
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


torch.save = lambda obj, handle: real_save(obj, SlowFile(handle))
version = 0
while True:
    version += 1
    student = {f"module.backbone.w{i}": torch.full((65536,), float(version)) for i in range(32)}
    save_training_checkpoint({"student": student, "teacher": {"backbone.w": torch.zeros(1)}, "optimizer": {},
                              "epoch": version, "dino_loss": {}, "args": {}}, sys.argv[1])
    print(version, flush=True)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    saver = start([sys.executable, "-c", SLOW_SAVER, str(output_dir)], tmp_path / "saver")
    partial = output_dir / f"checkpoint.pth.tmp.{saver.pid}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # two complete saves (so a backup exists) and a third one started
            completed = len(output_of(tmp_path / "saver")[0].split())
            # well into the third save's 8 MiB: a file of a few bytes fails torch.load with another error
            if completed >= 2 and partial.exists() and partial.stat().st_size >= 1 << 20:
                saver.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        saver.kill()
        saver.wait()
    assert saver.returncode == -signal.SIGKILL
    completed = int(output_of(tmp_path / "saver")[0].split()[-1])
    assert completed >= 2
    # it died mid-write: a partial, unreadable temporary file; checkpoint.pth is the last complete save
    assert 0 < partial.stat().st_size < (output_dir / "checkpoint.pth").stat().st_size
    with pytest.raises(RuntimeError, match="zip archive"):
        torch.load(partial, weights_only=True)
    checkpoint, path = find_resume_checkpoint(str(output_dir))
    assert path == str(output_dir / "checkpoint.pth") and checkpoint["epoch"] == completed
    expected = torch.full((65536,), float(completed))
    assert all(torch.equal(value, expected) for value in checkpoint["student"].values())
    assert load(output_dir / "checkpoint.pth.backup")["epoch"] == completed - 1
    # the next save clears the dead writer's temporary file
    save_training_checkpoint(dict(checkpoint, epoch=completed + 1), str(output_dir))
    assert not partial.exists() and load(output_dir / "checkpoint.pth.backup")["epoch"] == completed


# --------------------------------------------------------------------------------------------------
# 4. Bad data
# --------------------------------------------------------------------------------------------------

IMAGEFOLDER_FLAGS = ("--arch", "vit_tiny", "--drop_path_rate", "0")


def run_script_on_imagefolder(monkeypatch, output_dir, data, *extra):
    """``run_script`` on the tiny config with an ImageFolder dataset at ``data``; returns the exit code."""
    return run_script(
        monkeypatch,
        *("--output_dir", str(output_dir), *TINY),
        *("--dataset_type", "imagefolder", "--data_path", str(data), *IMAGEFOLDER_FLAGS),
        *extra,
    )


def make_messy_imagefolder(root):
    """24 files in 2 class folders: 16 good RGB PNGs, 1 good JPEG, 4 odd colour modes, 3 unreadable files."""
    make_imagefolder(root, classes=("a", "b"), images_per_class=8, splits=("train",), size=(48, 48))
    train_dir = root / "train"
    write_image(train_dir / "a" / "extra.JPEG", random_image(48, 48, seed=99))
    pixels = random_image(48, 48, seed=5)
    Image.fromarray(pixels[..., 0]).save(train_dir / "a" / "grey.png")  # L
    Image.fromarray(pixels).convert("CMYK").save(train_dir / "a" / "cmyk.jpg")
    Image.fromarray(np.dstack([pixels, np.full((48, 48), 128, np.uint8)])).save(train_dir / "b" / "rgba.png")
    Image.fromarray(pixels[..., 1].astype(np.uint16) * 257).save(train_dir / "b" / "sixteen.png")  # I;16
    bad = [
        write_bad_file(train_dir / "a" / "truncated.png", "truncated"),
        write_bad_file(train_dir / "b" / "empty.jpg", "empty"),
        write_bad_file(train_dir / "b" / "notes.png", "text"),
    ]
    return bad


def test_colour_modes_are_converted_and_only_unreadable_files_are_flagged(tmp_path):
    bad = make_messy_imagefolder(tmp_path)
    base = ImageFolderDataset(tmp_path, "train")
    assert len(base) == 24
    modes = {Image.open(path).mode for path, _ in base.samples if path not in bad}
    assert modes >= {"RGB", "L", "CMYK", "RGBA"} and any(mode.startswith("I") for mode in modes)
    dataset = PerSampleSeededDataset(base, seed=0, skip_bad_files=True)
    for index, (path, _) in enumerate(base.samples):
        image, _, skipped = dataset[index]
        assert image.mode == "RGB" and image.size == (48, 48)
        assert skipped == int(path in bad), path
    sixteen = dataset[[p.name for p, _ in base.samples].index("sixteen.png")][0]
    assert np.asarray(sixteen).max() > 200  # 16-bit values scaled to 8 bits, not clipped to white or black


def test_training_skips_unreadable_files_and_counts_them_per_epoch(tmp_path):
    bad = make_messy_imagefolder(tmp_path / "data")
    output_dir = tmp_path / "run"
    run(
        output_dir,
        "--dataset_type",
        "imagefolder",
        "--data_path",
        str(tmp_path / "data"),
        *IMAGEFOLDER_FLAGS,
        "--num_workers",
        "2",
    )
    records = [record for record in train_log(output_dir) if "train_loss" in record]
    # 24 images, batch 4: every file is drawn once per epoch, so each epoch meets the 3 unreadable ones
    assert [record["train_skipped_files"] for record in records] == [3, 3]
    log = (output_dir / "logs" / "rank0.log").read_text()
    for path in bad:
        assert f"skipping unreadable file {path}" in log
    assert "grey.png" not in log and "cmyk.jpg" not in log and "sixteen.png" not in log
    assert "epoch 1: 3 unreadable file(s) skipped" in log
    assert load(output_dir / "checkpoint.pth")["iteration"] == 12


def train_log(output_dir):
    from cribo_utils.runtime.logger import read_training_log

    return read_training_log(output_dir)


def test_unreadable_file_stops_the_run_when_skipping_is_off(tmp_path, monkeypatch):
    bad = make_messy_imagefolder(tmp_path / "data")
    message = run_script_on_imagefolder(
        monkeypatch, tmp_path / "run", tmp_path / "data", "--skip_bad_files", "false", "--num_workers", "2"
    )
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
    assert message.startswith("main_cribo.py: error: cannot read image")
    assert any(str(path) in message for path in bad) and "--skip_bad_files" in message


def _empty(root):
    root.mkdir()


def _flat(root):
    for k in range(3):
        write_image(root / f"img{k}.png", random_image(40, 40, seed=k))


def _too_few(root):
    make_imagefolder(root, classes=("a",), images_per_class=2, splits=("train",))


@pytest.mark.parametrize(
    "make, expected",
    [
        (_empty, "has no class subfolders; expected"),
        (_flat, "holds images directly"),
        (lambda root: None, "does not exist or is not a folder; expected"),
        (_too_few, "fewer than one global batch"),
    ],
)
def test_empty_or_misplaced_dataset_stops_before_training(tmp_path, monkeypatch, make, expected):
    data = tmp_path / "data"
    make(data)
    monkeypatch.setattr(train.engine, "build_student_teacher", _no_model)
    message = run_script_on_imagefolder(monkeypatch, tmp_path / "run", data)
    assert isinstance(message, str) and "\n" not in message
    assert expected in message and str(data) in message
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def _no_model(*args, **kwargs):
    raise AssertionError("a network was built before the configuration was rejected")


# --------------------------------------------------------------------------------------------------
# 5. Bad numbers
# --------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30: the first update is finite but enormous, so the second forward pass overflows to NaN
    output_dir = tmp_path / "run"
    flags = ("--lr", "1e30", "--saveckp_freq_iters", "1", "--max_iters", "6")
    process = start(training_command(output_dir, *flags), tmp_path / "run")
    assert wait_for_exit(process, timeout=120) == 1
    _, err = output_of(tmp_path / "run")
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("main_cribo.py: error: non-finite loss at iteration 1 (epoch 0): loss nan")
    assert "loss_img" in line and "loss_obj" in line and "--lr" in line and "last good checkpoint" in line
    checkpoint = load(output_dir / "checkpoint.pth")
    assert checkpoint["iteration"] == 1  # written after the finite iteration 0, not overwritten after
    assert all(bool(torch.isfinite(value).all()) for value in checkpoint["student"].values())
    assert [record["iteration"] for record in step_records(output_dir)] == [1]


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    args = resolve_args(["--output_dir", str(tmp_path), *TINY])
    validate_args(args, 1)
    parts = train.build_training_parts(
        args, DistEnv(0, 0, 1, torch.device("cpu"), None), dataset_size=16, with_loader=False
    )
    train.save(parts, 0, 1)
    good = (tmp_path / "checkpoint.pth").read_bytes()
    with torch.no_grad():
        parts.student.backbone.blocks[0].mlp.fc1.weight[0, 0] = float("inf")
    with pytest.raises(train.NonFiniteLossError, match=r"iteration 2 \(backbone.blocks.0.mlp.fc1.weight\)"):
        train.save(parts, 0, 2)
    assert (tmp_path / "checkpoint.pth").read_bytes() == good


# --------------------------------------------------------------------------------------------------
# 6. Bad configuration and memory
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--arch", "vit_huge"], "--arch vit_huge: unknown architecture"),
        (["--image_size", "40"], "--image_size 40 is not divisible by --patch_size 16"),
        (["--n_tokens", "5"], "--n_tokens 5: needs 1 <= n_tokens <= 4 patches"),
        (["--queue_size", "2"], "--queue_size 2 is smaller than one global batch"),
        (["--batch_size", "-4"], "--batch_size -4: must be positive"),
        (["--dist_timeout", "0"], "--dist_timeout 0"),
    ],
)
def test_bad_configuration_stops_with_one_line_before_any_network(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(train.engine, "build_student_teacher", _no_model)
    message = run_script(monkeypatch, "--output_dir", str(tmp_path), *TINY, *flags)
    assert isinstance(message, str) and "\n" not in message, message
    assert expected in message


def test_config_file_with_unknown_keys_stops_with_one_line(tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text('{"arch": "vit_tiny", "learning_rate": 0.1, "epoch": 3}')
    message = run_script(monkeypatch, "--config", str(config), "--output_dir", str(tmp_path))
    assert "\n" not in message and "unknown key(s) epoch, learning_rate" in message


def test_global_batch_size_must_divide_across_processes():
    args = resolve_args([*TINY, "--batch_size", "12", "--queue_size", "32"])
    validate_args(args, 3)
    assert args.batch_size_per_gpu == 4
    args = resolve_args([*TINY, "--batch_size", "10", "--queue_size", "32"])
    with pytest.raises(ConfigError, match="--batch_size 10 does not divide across 4 processes; use a mult"):
        validate_args(args, 4)
    args = resolve_args([*TINY, "--queue_size", "32"])  # no --batch_size: the per-process value stands
    validate_args(args, 4)
    assert args.batch_size_per_gpu == 4


def test_absurd_queue_names_needed_and_available_memory_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(train.engine, "build_student_teacher", _no_model)
    message = run_script(monkeypatch, "--output_dir", str(tmp_path), *TINY, "--queue_size", "1000000000")
    # bank: 2 views x 2 tokens x 1e9 images x 192 x 4 bytes + 8 bytes per image (counts) = 2868.5 GiB
    assert "needs about 2868." in message and "memory bank 2868.5 GiB" in message
    assert "GiB is available on cpu" in message and "lower --queue_size" in message
    assert "--check_memory false" in message


def test_network_size_on_the_meta_device_matches_the_real_networks():
    from models.student_teacher import build_student_teacher

    for flags in (TINY, [*TINY, "--norm_last_layer", "false", "--out_dim", "100", "--depth", "2"]):
        args = resolve_args(flags)
        size = resources.network_size(network_config(args))
        student, teacher = build_student_teacher(network_config(args))
        assert size.parameters == sum(p.numel() for p in student.parameters())
        assert size.parameters == sum(p.numel() for p in teacher.parameters())
        assert size.trainable == sum(p.numel() for p in student.parameters() if p.requires_grad)
        assert (size.embed_dim, size.depth, size.hidden_dim, size.bottleneck_dim) == (
            192,
            args.depth,
            2048,
            256,
        )


def test_memory_estimate_by_hand():
    args = resolve_args([*TINY, "--queue_size", "1000", "--n_tokens", "3"])
    size = resources.network_size(network_config(args))
    estimate = resources.estimate_training_memory(run_shape(args), activation_bytes=4)
    assert estimate.bank_bytes == 2 * 3 * 1000 * 192 * 4 + 8 * 1000
    # student + teacher weights, gradients and two Adam moments of the trainable parameters
    assert estimate.networks_bytes == 4 * (2 * size.parameters + 3 * size.trainable)
    # backbone: 2B images x 1 block x 16 x T=5 tokens x D=192; heads: 2B (4H + 2b + 5 O) + 2M (4H + 2b + 7 Oc)
    # with B=4, M = B K / 2 = 6, H=2048, b=256, O=Oc=32
    backbone = 8 * 1 * 16 * 5 * 192
    heads = 8 * (4 * 2048 + 512 + 5 * 32) + 12 * (4 * 2048 + 512 + 7 * 32)
    assert estimate.activations_bytes == 4 * (backbone + heads)
    half = resources.estimate_training_memory(run_shape(args), activation_bytes=2)
    assert half.activations_bytes == 2 * backbone + 4 * heads
    assert estimate.total_bytes == estimate.bank_bytes + estimate.networks_bytes + estimate.activations_bytes
    # three local crops of 16 px per image add LB = 12 images of t = 2 tokens and 12 [CLS] head rows
    local = resolve_args([*TINY, "--queue_size", "1000", "--n_tokens", "3", "--local_crops_number", "3"])
    local.local_crops_size = 16
    with_local = resources.estimate_training_memory(run_shape(local), activation_bytes=4)
    extra = 12 * 1 * 16 * 2 * 192 + 12 * (4 * 2048 + 512 + 5 * 32)
    assert with_local.activations_bytes == estimate.activations_bytes + 4 * extra


@pytest.mark.parametrize(
    "flags, advice",
    [
        (["--queue_size", "100000000"], "lower --queue_size"),
        (["--batch_size_per_gpu", "200000"], "lower --batch_size_per_gpu"),
        (["--out_dim", "20000000"], "--out_dim"),
    ],
)
def test_memory_check_names_the_largest_part(monkeypatch, flags, advice):
    monkeypatch.setattr(resources, "available_memory", lambda device: (2 * resources.GIB, "test"))
    args = resolve_args([*TINY, *flags])
    with pytest.raises(resources.InsufficientMemoryError, match=advice) as info:
        resources.check_memory(run_shape(args), torch.device("cpu"), processes_per_node=1)
    assert "only 2.0 GiB is available on cpu (test)" in str(info.value)
    resources.check_memory(
        run_shape(resolve_args(TINY)), torch.device("cpu"), processes_per_node=1
    )  # the tiny run fits


def test_memory_check_counts_the_processes_sharing_a_node(monkeypatch):
    args = resolve_args(TINY)
    need = resources.estimate_training_memory(run_shape(args)).total_bytes
    monkeypatch.setattr(resources, "available_memory", lambda device: (int(need * 1.5), "test"))
    resources.check_memory(run_shape(args), torch.device("cpu"), processes_per_node=1)
    with pytest.raises(resources.InsufficientMemoryError, match="x 2 processes on this node"):
        resources.check_memory(run_shape(args), torch.device("cpu"), processes_per_node=2)


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {
                "memory.max": "1000000\n",
                "memory.current": "300000\n",
                "memory.stat": "anon 1\ninactive_file 50000\n",
            },
            1000000 - 300000 + 50000,
        ),
        ({"memory.max": "max\n", "memory.current": "300000\n"}, None),
        (
            {
                "memory/memory.limit_in_bytes": "2000000\n",
                "memory/memory.usage_in_bytes": "500000\n",
                "memory/memory.stat": "cache 7\ntotal_inactive_file 1000\n",
            },
            2000000 - 500000 + 1000,
        ),
        (
            {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"},
            None,
        ),
        ({}, None),
    ],
)
def test_cgroup_headroom_reads_v1_and_v2(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert resources.cgroup_headroom(str(tmp_path)) == expected


def test_available_memory_on_cpu_is_positive_and_bounded_by_meminfo():
    available, source = resources.available_memory(torch.device("cpu"))
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < available <= total and source
