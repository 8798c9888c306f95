"""Tests of the dense nearest-neighbour retrieval evaluation (cribo_utils.eval.dense_nn, eval_dense_nn.py)."""

import json
import math
import random
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cribo_utils.eval import dense_nn
from cribo_utils.eval.dense_nn import (
    DenseNNConfig,
    MemoryItems,
    MemoryPlan,
    PatchIndex,
    PatchLabels,
    build_memory,
    check_memory_fits,
    evaluate_dense_nn,
    patch_class_counts,
    plan_memory,
    select_memory_patches,
    shard_range,
    training_subset,
    transfer_labels,
)
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.ddp_helpers import run_distributed

# ------------------------------------------------------------------------------------------------
# A tiny fabricated dataset: vertical stripes one patch wide, each stripe one class drawn in its colour.
# ------------------------------------------------------------------------------------------------

PALETTE = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.float32)
NUM_CLASSES = len(PALETTE)
PATCH = 8
SIZE = 32


class StripeScenes:
    """``SIZE x SIZE`` images of ``SIZE / PATCH`` vertical stripes; stripe s of image i has class
    ``(i + s * (1 + i % 3)) % C`` (every class occurs), except that some stripes are random."""

    def __init__(self, num_images: int, offset: int = 0, ignore_fraction: float = 0.0) -> None:
        self.num_images = num_images
        self.offset = offset
        self.ignore_fraction = ignore_fraction
        self.num_classes = NUM_CLASSES
        self.class_names = [f"class{c}" for c in range(NUM_CLASSES)]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image]:
        i = index + self.offset
        stripes = [(i + s * (1 + i % 3)) % NUM_CLASSES for s in range(SIZE // PATCH)]
        mask = np.repeat(np.repeat(np.array(stripes, dtype=np.uint8)[None], SIZE, 0), PATCH, 1)
        image = PALETTE[torch.from_numpy(mask).long()].numpy().astype(np.uint8)
        if self.ignore_fraction:
            rng = np.random.default_rng(i)
            mask = np.where(rng.random(mask.shape) < self.ignore_fraction, 255, mask).astype(np.uint8)
        return Image.fromarray(image), Image.fromarray(mask)


class OracleBackbone(nn.Module):
    """Patch features = one-hot of the majority class of the patch, read back from the pixel colours."""

    def __init__(self, embed_dim: int = 8, patch_size: int = PATCH) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("palette", (PALETTE / 255.0 - mean) / std)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, 3)
        labels = torch.cdist(pixels.reshape(-1, 3), self.palette).argmin(1).view(pixels.shape[:3])
        one_hot = F.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
        majority = F.avg_pool2d(one_hot, self.patch_size).argmax(1).flatten(1)  # (B, N)
        patches = F.one_hot(majority, self.embed_dim).float()
        return patches.sum(1), patches


class RandomBackbone(nn.Module):
    """Patch features drawn at random, independent of the image."""

    def __init__(self, embed_dim: int = 16, patch_size: int = PATCH) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        num_patches = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        patches = torch.randn(x.shape[0], num_patches, self.embed_dim)
        return patches.mean(1), patches


def _no_augmentation(**overrides: Any) -> DenseNNConfig:
    values: dict[str, Any] = dict(
        input_size=SIZE,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        jitter_strength=0.0,
        augmentation_epochs=1,
        batch_size=4,
        num_workers=0,
        progress=False,
        num_neighbours=5,
    )
    values.update(overrides)
    return DenseNNConfig(**values)


# ------------------------------------------------------------------------------------------------
# Patch labels and the rarity sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_to_background", [True, False])
def test_patch_class_counts_match_slow_reference(ignore_to_background: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (2, 8, 12), generator=generator)
    masks[torch.rand(masks.shape, generator=generator) < 0.2] = 255
    counts = patch_class_counts(masks, 4, 4, ignore_to_background=ignore_to_background)
    assert counts.shape == (2, 6, 4)
    for b in range(2):
        for row in range(2):
            for col in range(3):
                block = masks[b, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].flatten().tolist()
                if ignore_to_background:
                    block = [0 if value == 255 else value for value in block]  # ignore -> class 0
                expected = [block.count(c) for c in range(4)]
                assert counts[b, row * 3 + col].tolist() == expected
    ignored = (masks == 255).view(2, 2, 4, 3, 4).sum((2, 4)).flatten(1)  # ignore pixels per patch
    assert torch.equal(counts.sum(-1), 16 - (0 if ignore_to_background else 1) * ignored)


def test_fully_ignored_patches_are_kept_last() -> None:
    """With ignore pixels dropped, a patch without labelled pixels scores +inf instead of 0."""
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 255  # patch 0 is all ignore
    counts = patch_class_counts(masks, 4, 2, ignore_to_background=False)
    assert counts[0, 0].tolist() == [0, 0]
    assert select_memory_patches(counts, torch.full((1, 4), 0.5), 3).tolist() == [[1, 2, 3]]
    assert dense_nn.resolve_memory_ignore("auto", "ade20k") is False
    assert dense_nn.resolve_memory_ignore("auto", "voc") is True
    assert dense_nn.resolve_memory_ignore("drop", "voc") is False


def test_patch_class_counts_reject_unknown_labels() -> None:
    with pytest.raises(ValueError, match="class ids in \\[0, 3\\)"):
        patch_class_counts(torch.full((1, 4, 4), 5), 4, 3)


def _slow_selection(counts: Tensor, noise: Tensor, num_keep: int) -> list[list[int]]:
    kept = []
    for b in range(counts.shape[0]):
        classes_of_patch = [
            {c for c in range(counts.shape[2]) if counts[b, n, c] > 0} for n in range(counts.shape[1])
        ]
        patches_with_class = {
            c: sum(c in classes for classes in classes_of_patch) for c in range(counts.shape[2])
        }
        scores = [
            float(torch.tensor(float(sum(patches_with_class[c] for c in classes))) * noise[b, n])
            for n, classes in enumerate(classes_of_patch)
        ]
        order = sorted(range(len(scores)), key=lambda n: scores[n])
        kept.append(sorted(order[:num_keep]))
    return kept


def test_memory_sampling_follows_rarity_rule() -> None:
    generator = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 5, (3, 16, 16), generator=generator)
    masks[:, :, :8] = 0  # a dominant class, so rarity matters
    counts = patch_class_counts(masks, 4, 5)
    noise = torch.rand(3, 16, generator=generator)
    kept = select_memory_patches(counts, noise, 5)
    assert kept.tolist() == _slow_selection(counts, noise, 5)


def test_memory_sampling_prefers_rare_classes() -> None:
    """Hand example: one patch of a rare class among 15 background patches; with equal noise it is kept."""
    counts = torch.zeros(1, 16, 3, dtype=torch.long)
    counts[0, :, 0] = 16
    counts[0, 7] = torch.tensor([10, 0, 6])  # score 16 (background in 16 patches) + 1 = 17 ...
    counts[0, 3] = torch.tensor([0, 16, 0])  # ... vs 1 for a pure rare patch, vs 16 for pure background
    kept = select_memory_patches(counts, torch.full((1, 16), 0.5), 1)
    assert kept.tolist() == [[3]]


def test_patch_labels_round_trip_and_dtypes() -> None:
    generator = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 7, (2, 16, 16), generator=generator)
    counts = patch_class_counts(masks, 16, 7).reshape(-1, 7)
    labels = PatchLabels.from_counts(counts, 256)
    assert labels.classes.dtype == torch.uint8 and labels.counts.dtype == torch.int16  # 256 > 255 pixels
    assert labels.width == int((counts > 0).sum(1).max())
    assert torch.allclose(labels.to_dense(), counts.float() / 256)
    small = PatchLabels.from_counts(patch_class_counts(masks, 8, 7).reshape(-1, 7), 64)
    assert small.counts.dtype == torch.uint8
    pure = PatchLabels.from_counts(torch.tensor([[0, 0, 256, 0, 0, 0, 0]]), 256)
    assert pure.width == 1
    joined = PatchLabels.concatenate([labels, pure], 7, 256)
    assert joined.width == labels.width
    assert torch.equal(joined.to_dense()[-1], torch.tensor([0.0, 0, 1, 0, 0, 0, 0]))
    assert torch.allclose(joined.to_dense()[:-1], counts.float() / 256)


def test_transfer_labels_matches_slow_reference() -> None:
    generator = torch.Generator().manual_seed(3)
    counts = torch.distributions.Multinomial(16, torch.rand(6)).sample((40,)).long()
    labels = PatchLabels.from_counts(counts, 16)
    similarities = torch.rand(5, 7, generator=generator) * 2 - 1
    ids = torch.randint(0, 40, (5, 7), generator=generator)
    ids[0, 3] = -1  # an IVF search that found only 6 candidates
    out = transfer_labels(similarities, ids, labels, temperature=0.07)
    dense = counts.float() / 16
    for q in range(5):
        valid = [j for j in range(7) if ids[q, j] >= 0]
        weights = [math.exp(similarities[q, j].item() / 0.07) for j in valid]
        expected = sum(w * dense[ids[q, j]] for w, j in zip(weights, valid, strict=True)) / sum(weights)
        assert torch.allclose(out[q], expected, atol=1e-5)
    assert torch.allclose(out.sum(1), torch.ones(5))
    # Hand value: two neighbours, similarities 0.02 apart at beta 0.02 -> weights e/(1+e) and 1/(1+e).
    two = PatchLabels.from_counts(torch.tensor([[4, 0], [0, 4]]), 4)
    out = transfer_labels(torch.tensor([[0.52, 0.5]]), torch.tensor([[0, 1]]), two, 0.02)
    assert torch.allclose(out, torch.tensor([[math.e / (1 + math.e), 1 / (1 + math.e)]]))


# ------------------------------------------------------------------------------------------------
# faiss search
# ------------------------------------------------------------------------------------------------


def _unit(n: int, d: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_exact_search_equals_bruteforce_topk() -> None:
    memory, queries = _unit(500, 16, 0), _unit(40, 16, 1)
    index = PatchIndex(16, "exact")
    index.add(memory[:300])
    index.add(memory[300:])  # ids continue across add calls
    similarities, ids = index.search(queries, 10)
    expected = (queries @ memory.T).topk(10, dim=1)
    assert torch.equal(ids, expected.indices)
    assert torch.allclose(similarities, expected.values, atol=1e-5)


def test_ivf_with_all_lists_probed_equals_exact() -> None:
    memory, queries = _unit(800, 16, 2), _unit(30, 16, 3)
    exact = PatchIndex(16, "exact")
    exact.add(memory)
    ivf = PatchIndex(16, "ivf", nlist=8, nprobe=8)
    ivf.train(memory)
    ivf.add(memory)
    assert torch.equal(ivf.search(queries, 10)[1], exact.search(queries, 10)[1])
    # With one list probed the search is approximate: its k-th similarities can never exceed the exact ones.
    ivf.index.nprobe = 1
    approx_similarities, _ = ivf.search(queries, 10)
    assert torch.all(approx_similarities <= exact.search(queries, 10)[0] + 1e-5)


# ------------------------------------------------------------------------------------------------
# Plan, subset, sharding, RAM check
# ------------------------------------------------------------------------------------------------


def test_plan_memory_by_hand_and_error() -> None:
    assert plan_memory(80, 2, 1024, 102400).patches_kept_per_image == 640  # 102400 // 160
    assert plan_memory(80, 2, 1024, 100).patches_kept_per_image == 1  # max(1, 0)
    assert plan_memory(80, 2, 1024, None).size == 80 * 2 * 1024
    with pytest.raises(ValueError, match="--augmentation_epochs 125 or more.*--memory_size 163840 or less"):
        plan_memory(80, 2, 1024, 10_240_000)  # PVOC 1/128 at 512 px: 64000 > 1024 patches per crop


def test_training_subset_is_fixed_and_seeded() -> None:
    subset = training_subset(1000, 1 / 128, seed=42)
    assert len(subset) == 8 and subset == sorted(subset) and subset == training_subset(1000, 1 / 128, 42)
    assert subset != training_subset(1000, 1 / 128, 43)
    assert list(training_subset(5, 1.0, 0)) == [0, 1, 2, 3, 4]


def test_shard_range_splits_whole_batches() -> None:
    for num_items, batch, world in [(23, 4, 2), (5, 4, 3), (16, 4, 4), (1, 8, 2)]:
        ranges = [shard_range(num_items, batch, r, world) for r in range(world)]
        covered = [i for start, stop in ranges for i in range(start, stop)]
        assert covered == list(range(num_items))
        assert all(start % batch == 0 for start, stop in ranges if stop > start)


def test_ram_check_message() -> None:
    plan = MemoryPlan(num_images=10_582, passes=2, patches_per_image=1024, patches_kept_per_image=484)
    with pytest.raises(
        MemoryError, match=r"--memory_size 10240000: .* GiB .* only 1.0 GiB .* --memory_size \d+"
    ):
        check_memory_fits(plan, 384, 21, 16, "exact", 10_240_000, available=2**30)
    estimate = check_memory_fits(plan, 384, 21, 16, "exact", 10_240_000, available=2**50)
    assert estimate["index"] == 2 * plan.size * 384 * 4  # a faiss copy, twice while it grows


class _HugeDataset:
    """Claims a billion images; fetching any of them is a test failure (the check must come first)."""

    num_classes = 21

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> Any:
        raise AssertionError("the RAM check must fail before any image is read")


def test_ram_check_fails_before_any_work() -> None:
    backbone = RandomBackbone(embed_dim=384, patch_size=16)
    cfg = DenseNNConfig(input_size=512, memory_size=10**11, augmentation_epochs=1, progress=False)
    with pytest.raises(MemoryError, match="--memory_size 100000000000"):
        build_memory(backbone, _HugeDataset(), cfg, 21)


# ------------------------------------------------------------------------------------------------
# Seeded memory items
# ------------------------------------------------------------------------------------------------


def test_memory_items_are_seeded_per_image_and_pass() -> None:
    items = MemoryItems(
        StripeScenes(6),
        [1, 3, 4],
        passes=2,
        transform=dense_nn.memory_transform(DenseNNConfig(input_size=SIZE)),
        num_patches=16,
        seed=0,
    )
    assert len(items) == 6
    torch.manual_seed(123)
    random.seed(5)
    before = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(5)
    first = [items[t] for t in (4, 0, 2)]
    after = torch.rand(1), random.random()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]  # caller's RNG untouched
    again = [items[t] for t in (2, 4, 0)]
    for a, b in zip(first, [again[1], again[2], again[0]], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(items[0][0], items[3][0])  # same image (index 1), other pass: other crop
    assert not torch.equal(items[0][2], items[3][2])


# ------------------------------------------------------------------------------------------------
# Whole protocol
# ------------------------------------------------------------------------------------------------


def test_oracle_features_give_full_miou() -> None:
    results = evaluate_dense_nn(
        OracleBackbone(), StripeScenes(12), StripeScenes(8, offset=100), _no_augmentation(memory_size=12 * 6)
    )
    assert results["miou"] == pytest.approx(1.0)
    assert results["pixel_accuracy"] == pytest.approx(1.0)
    assert results["num_present_classes"] == NUM_CLASSES
    assert results["memory_entries"] == 72 and results["patches_kept_per_image"] == 6


def test_oracle_features_with_protocol_augmentation_and_ignore_pixels() -> None:
    """Random crops blur stripes across patches and 10 % of the memory pixels are ignore (relabelled 0):
    the oracle stays nearly perfect, which checks that crops and masks stay aligned."""
    cfg = _no_augmentation(crop_scale=(0.5, 2.0), crop_ratio=(3 / 4, 4 / 3), augmentation_epochs=2)
    results = evaluate_dense_nn(
        OracleBackbone(), StripeScenes(12, ignore_fraction=0.1), StripeScenes(8, offset=100), cfg
    )
    assert results["miou"] > 0.85


def test_random_features_give_low_miou() -> None:
    oracle = evaluate_dense_nn(
        OracleBackbone(), StripeScenes(12), StripeScenes(8, offset=100), _no_augmentation()
    )
    random_features = evaluate_dense_nn(
        RandomBackbone(), StripeScenes(12), StripeScenes(8, offset=100), _no_augmentation()
    )
    assert oracle["miou"] == pytest.approx(1.0)
    assert random_features["miou"] < 0.4


def test_ivf_index_end_to_end() -> None:
    cfg = _no_augmentation(index="ivf", nlist=2, nprobe=2)
    results = evaluate_dense_nn(OracleBackbone(), StripeScenes(12), StripeScenes(8, offset=100), cfg)
    assert results["miou"] == pytest.approx(1.0) and results["nlist"] == 2


# ------------------------------------------------------------------------------------------------
# 1 process vs 2 processes (gloo)
# ------------------------------------------------------------------------------------------------


def _distributed_run(memory_size: int, index: str) -> dict[str, Any]:
    from cribo_utils.runtime.distributed import all_gather_varlen, get_world_size
    from models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=PATCH, img_size=SIZE, depth=2).eval()
    cfg = DenseNNConfig(
        input_size=SIZE,
        memory_size=memory_size,
        augmentation_epochs=2,
        batch_size=4,
        num_workers=0,
        progress=False,
        num_neighbours=5,
        seed=3,
        index=index,
    )
    memory = build_memory(backbone, StripeScenes(10, ignore_fraction=0.05), cfg, NUM_CLASSES)
    accumulator = dense_nn.evaluate_memory(backbone, memory, StripeScenes(7, offset=50), NUM_CLASSES, cfg)
    local = memory.index.local
    if index == "torch":
        local_features = local.features.cpu()
    else:
        local_features = torch.from_numpy(local.index.reconstruct_n(0, len(local)))
    return {
        "world_size": get_world_size(),
        "local_rows": len(local),
        "shard_sizes": memory.index.shard_sizes,
        "features": all_gather_varlen(local_features),
        "labels": memory.labels.to_dense(),
        "confusion": accumulator.confusion,
    }


@pytest.mark.slow
@pytest.mark.parametrize("index", ["torch", "exact"])
def test_one_and_two_processes_give_identical_results(index: str) -> None:
    """Same memory, same neighbours, same confusion matrix; each of 2 processes holds about half."""
    if index == "exact":
        pytest.importorskip("faiss")
    single = _distributed_run(100, index)  # this process: a world of one, one thread (conftest)
    pair = run_distributed(_distributed_run, 100, index, world_size=2, timeout_s=120)
    assert single["world_size"] == 1 and pair[0]["world_size"] == 2
    assert single["features"].shape == (10 * 2 * 5, 192)  # 100 // (10 x 2) = 5 patches per crop
    assert single["confusion"].sum() == 7 * SIZE * SIZE
    # 20 items in batches of 4: rank 0 extracts batches 0-1 (8 items), rank 1 batches 2-4 (12 items).
    assert [result["local_rows"] for result in pair] == [40, 60] == pair[0]["shard_sizes"]
    for result in pair:
        assert torch.equal(result["features"], single["features"])
        assert torch.equal(result["labels"], single["labels"])
        assert torch.equal(result["confusion"], single["confusion"])


def test_torch_and_faiss_search_give_the_same_miou() -> None:
    pytest.importorskip("faiss")
    scores = {}
    for index in ("torch", "exact"):
        cfg = _no_augmentation(index=index)
        torch.manual_seed(0)  # the same random features for both searches
        scores[index] = evaluate_dense_nn(
            RandomBackbone(), StripeScenes(12), StripeScenes(8, offset=100), cfg
        )["confusion_matrix"]
    assert scores["torch"] == scores["exact"]


def test_fp16_memory_stores_half_precision_and_finds_the_neighbours_of_its_rounded_features() -> None:
    from cribo_utils.eval.sharded_search import TorchShardIndex

    features = F.normalize(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    queries = F.normalize(torch.randn(20, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    index = TorchShardIndex(32, dtype=torch.float16)
    index.add(features.half())
    similarities, ids = index.search(queries, 5)
    rounded = queries @ features.half().float().T  # the products of the rounded memory, in float32
    expected = rounded.argsort(dim=1, descending=True, stable=True)[:, :5]
    assert index.nbytes() == 300 * 32 * 2 and similarities.dtype == torch.float32
    assert torch.equal(ids, expected) and torch.allclose(similarities, rounded.gather(1, expected))
    confusions = {}
    for dtype in ("fp32", "fp16"):
        torch.manual_seed(0)
        cfg = _no_augmentation(memory_dtype=dtype)
        confusions[dtype] = torch.tensor(
            evaluate_dense_nn(RandomBackbone(), StripeScenes(12), StripeScenes(8, offset=100), cfg)[
                "confusion_matrix"
            ]
        )
    changed = (confusions["fp32"] - confusions["fp16"]).abs().sum() / 2
    assert changed <= 0.01 * confusions["fp32"].sum()  # near-ties at most


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def test_eval_dense_nn_main_writes_json(tmp_path: Any) -> None:
    import eval_dense_nn

    output = tmp_path / "result.json"
    results = eval_dense_nn.main(
        [
            "--arch",
            "vit_tiny",
            "--patch_size",
            "16",
            "--synthetic_image_size",
            "32",
            "--synthetic_num_train",
            "6",
            "--synthetic_num_val",
            "3",
            "--batch_size_per_gpu",
            "4",
            "--num_workers",
            "0",
            "--augmentation_epochs",
            "1",
            "--memory_size",
            "18",
            "--num_neighbours",
            "4",
            "--output_json",
            str(output),
            "--no_progress",
        ]
    )
    written = json.loads(output.read_text())
    assert written["miou"] == pytest.approx(results["miou"])
    assert 0.0 <= written["miou"] <= 1.0
    assert len(written["per_class_iou"]) == 5 and "background" in written["per_class_iou"]  # easy: 4 textures
    assert written["random_init"] is True and written["dataset"] == "synthetic"
    assert written["memory_entries"] == 18 and written["patches_kept_per_image"] == 3
    protocol = written["protocol"]
    for key, value in {
        "input_size": 32,
        "memory_size": 18,
        "num_neighbours": 4,
        "temperature": 0.02,
        "augmentation_epochs": 1,
        "index": "torch",
        "seed": 0,
        "train_fraction": 1.0,
    }.items():
        assert protocol[key] == value
    assert written["num_pixels"] == 3 * 32 * 32


def test_eval_dense_nn_main_rejects_unfillable_memory(tmp_path: Any) -> None:
    import eval_dense_nn

    with pytest.raises(ValueError, match="--augmentation_epochs 3 or more"):
        eval_dense_nn.main(
            [
                "--arch",
                "vit_tiny",
                "--synthetic_image_size",
                "32",
                "--synthetic_num_train",
                "6",
                "--synthetic_num_val",
                "2",
                "--augmentation_epochs",
                "1",
                "--memory_size",
                "60",
                "--num_workers",
                "0",
                "--output_json",
                str(tmp_path / "x.json"),
            ]
        )
