"""DINO's linear probe: features, classifier, schedule, a separable toy problem, eval_linear.py."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from cribo_utils.eval import linear_probe as lp
from cribo_utils.eval import linear_runner
from cribo_utils.eval.features import linear_probe_features
from models import build_backbone


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16, img_size=32, depth=3).eval()


def _manual_block_outputs(model, images):
    """Run the blocks one by one and apply the final norm to each output (not via the model helpers)."""
    tokens = model.prepare_tokens(images)
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(model.norm(tokens))
    return outputs


@pytest.mark.parametrize("n_last_blocks", [1, 2, 3])
@pytest.mark.parametrize("avgpool", [False, True])
def test_features_concatenate_last_blocks_and_pooled_patches(vit, n_last_blocks, avgpool):
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = linear_probe_features(vit, images, n_last_blocks, avgpool)
        outputs = _manual_block_outputs(vit, images)
        cls, patches = vit.forward_features(images)
    assert features.shape == (2, 192 * (n_last_blocks + avgpool))
    for position, block_output in enumerate(outputs[-n_last_blocks:]):
        torch.testing.assert_close(features[:, 192 * position : 192 * (position + 1)], block_output[:, 0])
    # The last [CLS] block is the model's own output; the pooled part is the mean of its patch tokens.
    torch.testing.assert_close(features[:, 192 * (n_last_blocks - 1) : 192 * n_last_blocks], cls)
    if avgpool:
        torch.testing.assert_close(features[:, -192:], patches.mean(dim=1))


def test_classifier_initialisation():
    torch.manual_seed(0)
    classifier = lp.LinearClassifier(1536, 1000)
    assert classifier.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(classifier.linear.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(classifier.linear.bias) == 0
    assert classifier(torch.zeros(3, 2, 768)).shape == (3, 1000)  # flattened like DINO's view(B, -1)


def test_scaled_lr():
    assert lp.scaled_lr(0.001, 128, 8) == pytest.approx(0.004)
    assert lp.scaled_lr(0.001, 256, 1) == pytest.approx(0.001)


def _blobs(num_train_per_class, num_val_per_class, num_classes, dim=16):
    """Well-separated Gaussian blobs: train and validation samples drawn around the same centres."""
    generator = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(num_classes, dim, generator=generator)
    train_y = torch.arange(num_classes).repeat(num_train_per_class)
    val_y = torch.arange(num_classes).repeat(num_val_per_class)
    train_x = centres[train_y] + 0.5 * torch.randn(train_y.shape[0], dim, generator=generator)
    val_x = centres[val_y] + 0.5 * torch.randn(val_y.shape[0], dim, generator=generator)
    return train_x, train_y, val_x, val_y


def test_learns_a_separable_problem_with_cosine_schedule():
    train_x, train_y, val_x, val_y = _blobs(20, 5, 6)
    torch.manual_seed(0)
    classifier = lp.LinearClassifier(16, 6)
    before = lp.evaluate_classifier(classifier, val_x, val_y)
    batches = lp.cached_feature_batches(train_x, train_y, batch_size=16, seed=0, device="cpu")
    fit = lp.fit_linear_classifier(classifier, batches, val_x, val_y, epochs=12, lr=0.05, val_freq=4)
    assert before["top1"] < 60.0
    assert fit["last"]["val_top1"] == 100.0 and fit["last"]["val_top5"] == 100.0
    assert fit["last"]["val_loss"] < before["loss"] / 4
    assert [r["epoch"] for r in fit["history"] if "val_top1" in r] == [3, 7, 11]
    expected_lrs = [0.05 * (1 + math.cos(math.pi * e / 12)) / 2 for e in range(12)]
    assert [r["lr"] for r in fit["history"]] == pytest.approx(expected_lrs)
    assert fit["best"]["val_top1"] == max(r["val_top1"] for r in fit["history"] if "val_top1" in r)


def test_evaluation_matches_brute_force():
    torch.manual_seed(0)
    classifier = lp.LinearClassifier(8, 7)
    features = torch.randn(40, 8)
    labels = torch.randint(0, 7, (40,))
    result = lp.evaluate_classifier(classifier, features, labels, batch_size=7)
    logits = features @ classifier.linear.weight.T + classifier.linear.bias
    top1 = sum(int(row.argmax()) == int(label) for row, label in zip(logits, labels, strict=True))
    top5 = sum(int(label) in row.topk(5).indices.tolist() for row, label in zip(logits, labels, strict=True))
    assert result["top1"] == pytest.approx(100 * top1 / 40) and result["top5"] == pytest.approx(
        100 * top5 / 40
    )
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    few_classes = lp.LinearClassifier(8, 3)
    assert set(lp.evaluate_classifier(few_classes, features, labels % 3)) == {"loss", "top1"}


def test_cached_batches_cover_every_sample_once_per_epoch_with_fresh_order():
    features = torch.arange(23.0).view(23, 1)
    labels = torch.arange(23)
    batches = lp.cached_feature_batches(features, labels, batch_size=5, seed=3, device="cpu")
    orders = []
    for epoch in range(2):
        epoch_batches = list(batches(epoch))
        assert [b[0].shape[0] for b in epoch_batches] == [5, 5, 5, 5, 3]
        order = torch.cat([b[1] for b in epoch_batches])
        assert sorted(order.tolist()) == list(range(23))
        assert torch.equal(torch.cat([b[0] for b in epoch_batches]).view(-1).long(), order)
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])
    again = torch.cat([b[1] for b in lp.cached_feature_batches(features, labels, 5, 3, "cpu")(0)])
    assert torch.equal(again, orders[0])


def test_training_input_defaults_and_conflicts():
    def resolve(dataset, train_aug=None, cache_features=None):
        return linear_runner.resolve_training_inputs(
            argparse.Namespace(dataset=dataset, train_aug=train_aug, cache_features=cache_features)
        )

    assert resolve("synthetic") == (False, True)
    assert resolve("imagenet1k") == (True, False)
    assert resolve("imagenet1k", train_aug=False) == (False, True)
    assert resolve("synthetic", cache_features=False) == (False, False)
    with pytest.raises(ValueError, match="--no_train_aug"):
        resolve("synthetic", train_aug=True, cache_features=True)


def _linear_argv(*extra):
    return [
        "--arch",
        "vit_tiny",
        "--synthetic_level",
        "legacy",  # 12 classes, so top-5 is reported
        "--synthetic_num_train",
        "24",
        "--synthetic_num_val",
        "12",
        "--image_size",
        "32",
        "--batch_size_per_gpu",
        "8",
        "--num_workers",
        "0",
        "--n_last_blocks",
        "2",
        "--avgpool_patchtokens",
        "true",
        *extra,
    ]


def test_eval_linear_end_to_end_cached(tmp_path):
    import eval_linear

    output = tmp_path / "linear.json"
    results = eval_linear.main(_linear_argv("--epochs", "3", "--val_freq", "2", "--output_json", str(output)))
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(results))
    assert written["cache_features"] is True and written["train_aug"] is False
    assert "cached features" in written["deviation"]
    assert written["feature_dim"] == 192 * 3 and written["num_classes"] == 12
    assert written["lr"] == pytest.approx(0.001 * 8 / 256)
    assert [r["epoch"] for r in written["history"] if "val_top1" in r] == [1, 2]
    assert written["last_top1"] == written["history"][-1]["val_top1"]
    assert 0.0 <= written["best_top1"] <= 100.0 and written["last_top5"] is not None
    saved = torch.load(tmp_path / "eval_linear_synthetic_checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 3 and saved["history"] == written["history"]
    assert saved["state_dict"]["linear.weight"].shape == (12, 192 * 3)


def test_eval_linear_end_to_end_augmented_next_to_checkpoint(tmp_path):
    import eval_linear

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=32, depth=2)
    checkpoint = tmp_path / "run" / "teacher_backbone.pth"
    checkpoint.parent.mkdir()
    torch.save(backbone.state_dict(), checkpoint)
    results = eval_linear.main(
        _linear_argv("--epochs", "1", "--train_aug", "--pretrained_weights", str(checkpoint))
    )
    written = json.loads((tmp_path / "run" / "eval_linear_synthetic.json").read_text())
    assert (
        written["train_aug"] is True and written["cache_features"] is False and written["deviation"] is None
    )
    assert written["depth"] == 2 and written["best_top1"] == results["best_top1"]
    assert (tmp_path / "run" / "eval_linear_synthetic_checkpoint.pth").is_file()


def _fit_blobs(batch_size):
    """Train on 24 blob samples; under 2 ranks each rank sees its DistributedSampler shard."""
    train_x, train_y, val_x, val_y = _blobs(4, 3, 6)
    torch.manual_seed(0)
    classifier = lp.LinearClassifier(16, 6)
    batches = lp.cached_feature_batches(train_x, train_y, batch_size=batch_size, seed=0, device="cpu")
    fit = lp.fit_linear_classifier(classifier, batches, val_x, val_y, epochs=3, lr=0.05)
    return classifier.state_dict(), fit["history"]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_global_batch():
    from ddp_helpers import run_distributed

    # DistributedSampler interleaves one permutation over the ranks, so batch i of 4 on each of 2 ranks
    # holds exactly the samples of batch i of 8 in one process; DDP averages the two equal-size means.
    single_state, single_history = _fit_blobs(8)
    per_rank = run_distributed(_fit_blobs, 4, world_size=2, timeout_s=120)
    for state, history in per_rank:
        for name, value in single_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-7)
        assert [r["train_loss"] for r in history] == pytest.approx(
            [r["train_loss"] for r in single_history], rel=1e-4
        )
    assert torch.equal(per_rank[0][0]["linear.weight"], per_rank[1][0]["linear.weight"])


def _probe_argv(output_dir, *extra):
    """An augmented probe (DINO's protocol), so that resuming must also replay the epochs' augmentations."""
    argv = _linear_argv(
        "--epochs", "3", "--train_aug", "true", "--depth", "2", "--output_dir", str(output_dir)
    )
    return [*argv, "--synthetic_num_train", "16", *extra]


def test_an_interrupted_probe_resumes_exactly_when_rerun(tmp_path, monkeypatch):
    import eval_linear

    uninterrupted = eval_linear.main(_probe_argv(tmp_path / "a"))
    calls = []
    real_train_one_epoch = lp.train_one_epoch

    def dies_in_the_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(lp, "train_one_epoch", dies_in_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        eval_linear.main(_probe_argv(tmp_path / "b"))
    checkpoint = tmp_path / "b" / "eval_linear_synthetic_checkpoint.pth"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    assert not (tmp_path / "b" / "eval_linear_synthetic.json").exists()
    monkeypatch.setattr(lp, "train_one_epoch", real_train_one_epoch)
    resumed = eval_linear.main(_probe_argv(tmp_path / "b"))
    for got, want in zip(resumed["history"], uninterrupted["history"], strict=True):
        assert got == pytest.approx(want)  # same keys, same epoch, same values (approx takes flat dicts only)
    a = torch.load(tmp_path / "a" / "eval_linear_synthetic_checkpoint.pth", weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6)
    assert a["epoch"] == b["epoch"] == 3 and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path):
    import eval_linear
    from cribo_utils.eval.cli import EvalConfigError

    eval_linear.main(_probe_argv(tmp_path, "--epochs", "1"))
    with pytest.raises(
        EvalConfigError, match=r"epochs 1 -> 2; base_lr 0\.001 -> 0\.01.*another --output_dir"
    ):
        eval_linear.main(_probe_argv(tmp_path, "--epochs", "2", "--lr", "0.01"))


def test_evaluate_scores_the_trained_probe_only(tmp_path):
    import eval_linear
    from cribo_utils.eval.cli import EvalConfigError

    with pytest.raises(EvalConfigError, match="--evaluate needs a trained probe"):
        eval_linear.main(_probe_argv(tmp_path, "--evaluate"))
    trained = eval_linear.main(_probe_argv(tmp_path, "--epochs", "2"))
    evaluated = eval_linear.main(_probe_argv(tmp_path, "--evaluate", "--epochs", "7"))  # epochs: unused
    assert evaluated["evaluate_only"] is True and evaluated["last_top1"] == trained["last_top1"]
    assert evaluated["output_json"].endswith("eval_linear_synthetic_evaluate.json")
    assert json.loads((tmp_path / "eval_linear_synthetic.json").read_text())["evaluate_only"] is False


def test_num_labels_is_the_classifier_size(tmp_path):
    import eval_linear
    from cribo_utils.eval.cli import EvalConfigError

    results = eval_linear.main(
        _linear_argv("--epochs", "1", "--num_labels", "20", "--output_dir", str(tmp_path))
    )
    saved = torch.load(tmp_path / "eval_linear_synthetic_checkpoint.pth", weights_only=True)
    assert results["num_labels"] == 20 and saved["state_dict"]["linear.weight"].shape[0] == 20
    with pytest.raises(EvalConfigError, match="--num_labels 5 is below the 12 classes"):
        eval_linear.main(_linear_argv("--num_labels", "5", "--output_dir", str(tmp_path / "other")))
