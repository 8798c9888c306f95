"""Weighted k-NN classifier, data-parallel feature extraction and the eval_knn.py launcher."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import run_distributed

from cribo_utils.eval import features as feat
from cribo_utils.eval.knn import knn_classify, knn_scores, knn_scores_multi_k, topk_accuracy
from models import build_backbone


def _brute_force_scores(train, train_labels, test, k, temperature, num_classes):
    """One test sample at a time: sort similarities, add exp(s/T) to each of the k nearest labels."""
    scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for row, query in enumerate(test.double()):
        similarities = [
            (float(query @ sample.double()), int(label))
            for sample, label in zip(train, train_labels, strict=True)
        ]
        similarities.sort(key=lambda pair: -pair[0])
        for similarity, label in similarities[:k]:
            scores[row, label] += math.exp(similarity / temperature)
    return scores


def _random_problem(num_train=50, num_test=13, dim=8, num_classes=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(num_train, dim, generator=generator), dim=1)
    test = F.normalize(torch.randn(num_test, dim, generator=generator), dim=1)
    train_labels = torch.randint(0, num_classes, (num_train,), generator=generator)
    test_labels = torch.randint(0, num_classes, (num_test,), generator=generator)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_scores_match_brute_force_vote(k):
    train, train_labels, test, _ = _random_problem()
    expected = _brute_force_scores(train, train_labels, test, k, 0.07, 7)
    for chunk_size in (None, 4, 1):  # several chunks, a partial last chunk, one row per chunk
        scores = knn_scores(
            train, train_labels, test, k, temperature=0.07, num_classes=7, chunk_size=chunk_size
        )
        assert scores.shape == (13, 7)
        torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=0.0)


def test_multi_k_equals_separate_searches():
    train, train_labels, test, _ = _random_problem()
    together = knn_scores_multi_k(train, train_labels, test, (3, 10, 20), 0.1, 7)
    for k in (3, 10, 20):
        assert torch.equal(together[k], knn_scores(train, train_labels, test, k, 0.1, 7))


def test_scores_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([2, 0, 2])
    test = torch.tensor([[1.0, 0.0]])
    # similarities 1, 0, 0.6; with k = 2 the neighbours are samples 0 and 2, both of class 2.
    scores = knn_scores(train, labels, test, k=2, temperature=0.5, num_classes=3)
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.0, math.exp(2.0) + math.exp(1.2)]]))
    scores = knn_scores(train, labels, test, k=3, temperature=0.5, num_classes=4)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0, math.exp(2.0) + math.exp(1.2), 0.0]]))


def test_accuracy_matches_brute_force_ranking():
    train, train_labels, test, test_labels = _random_problem(num_test=40)
    results = knn_classify(
        train, train_labels, test, test_labels, ks=(5, 20), temperature=0.07, num_classes=7
    )
    for k in (5, 20):
        scores = _brute_force_scores(train, train_labels, test, k, 0.07, 7)
        top1 = top5 = 0
        for row, label in enumerate(test_labels.tolist()):
            ranking = sorted(range(7), key=lambda c: -scores[row, c].item())
            top1 += ranking[0] == label
            top5 += label in ranking[:5]
        assert results[k]["top1"] == pytest.approx(100 * top1 / 40)
        assert results[k]["top5"] == pytest.approx(100 * top5 / 40)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(scores, labels, (1, 2, 3)) == {
        1: pytest.approx(100 / 3),
        2: pytest.approx(200 / 3),
        3: 100.0,
    }


def test_separable_features_are_classified_perfectly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(6, 16) * 5
    train_labels = torch.arange(6).repeat(10)
    test_labels = torch.arange(6).repeat(3)
    train = centres[train_labels] + 0.3 * torch.randn(60, 16, generator=generator)
    test = centres[test_labels] + 0.3 * torch.randn(18, 16, generator=generator)
    results = knn_classify(train, train_labels, test, test_labels, ks=(1, 5, 10), num_classes=6)
    assert all(result == {"top1": 100.0, "top5": 100.0} for result in results.values())


def test_few_test_images_few_classes_and_no_top5_below_five_classes():
    train, train_labels, test, test_labels = _random_problem(num_train=12, num_test=3, num_classes=3)
    results = knn_classify(train, train_labels, test, test_labels, ks=(2, 12), num_classes=3)
    assert set(results) == {2, 12} and all(set(result) == {"top1"} for result in results.values())


def test_bad_k_is_an_error():
    train, train_labels, test, _ = _random_problem(num_train=5)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        knn_scores(train, train_labels, test, k=6)


def test_ordered_gather_single_process_restores_dataset_order():
    values = torch.arange(10.0).view(5, 2)
    indices = torch.tensor([3, 0, 4, 1, 2])
    out = feat.ordered_gather(values, indices, total=5)
    assert torch.equal(out[indices], values)
    with pytest.raises(RuntimeError, match="1 of 6 dataset items"):
        feat.ordered_gather(values, indices, total=6)


def _tiny_setup():
    from data.synthetic import SyntheticScenes
    from data.transforms import eval_transform

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=16, img_size=32, depth=2).eval()
    dataset = SyntheticScenes("val", image_size=32, num_train=4, num_val=7, transform=eval_transform(32, 32))
    return model, dataset


def _extract_all_kinds(batch_size=2):
    model, dataset = _tiny_setup()
    loader = feat.build_eval_loader(dataset, batch_size=batch_size, num_workers=0)
    out = {}
    for kind in ("cls", "patch", "linear"):
        out[kind] = feat.extract_features(model, loader, "cpu", kind=kind, n_last_blocks=2, avgpool=True)
    out["batches_on_this_rank"] = len(loader)
    return out


def test_extracted_features_follow_dataset_order():
    model, dataset = _tiny_setup()
    result = _extract_all_kinds()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        cls, patches = model.forward_features(images)
    assert torch.equal(result["cls"][1], labels) and result["cls"][1].dtype == torch.long
    torch.testing.assert_close(result["cls"][0], cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["patch"][0], patches, rtol=1e-5, atol=1e-5)
    assert result["linear"][0].shape == (7, 192 * 3)
    torch.testing.assert_close(result["linear"][0][:, 192:384], cls, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_give_the_same_features_as_one():
    # Batches of one image make every forward pass identical in both runs, so equality is exact.
    single = _extract_all_kinds(batch_size=1)
    per_rank = run_distributed(_extract_all_kinds, 1, world_size=2, timeout_s=120)
    # 7 samples over 2 ranks: 4 per rank (rank 1 repeats sample 0 as padding) instead of 7.
    assert single["batches_on_this_rank"] == 7 and [r["batches_on_this_rank"] for r in per_rank] == [4, 4]
    for kind in ("cls", "patch", "linear"):
        for result in per_rank:
            assert torch.equal(result[kind][1], single[kind][1])
            assert torch.equal(result[kind][0], single[kind][0])


def _knn_argv(tmp_path, *extra):
    return [
        "--arch",
        "vit_tiny",
        "--dataset",
        "synthetic",
        "--synthetic_level",
        "legacy",  # 12 classes, so top-5 is reported
        "--synthetic_num_train",
        "24",
        "--synthetic_num_val",
        "10",
        "--image_size",
        "32",
        "--nb_knn",
        "5",
        "10",
        "40",
        "--batch_size_per_gpu",
        "16",
        "--num_workers",
        "0",
        *extra,
    ]


def test_eval_knn_end_to_end_random_weights(tmp_path, capsys):
    import eval_knn

    output = tmp_path / "knn.json"
    dump = tmp_path / "features"
    results = eval_knn.main(_knn_argv(tmp_path, "--output_json", str(output), "--dump_features", str(dump)))
    assert "WARNING cribo_utils.weights.checkpoint_formats: RANDOM INITIALISATION" in capsys.readouterr().out
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(results))
    assert written["nb_knn"] == [5, 10, 24]  # 40 lowered to the 24 training images
    assert written["num_classes"] == 12 and written["num_train"] == 24 and written["num_val"] == 10
    assert written["temperature"] == 0.07 and written["image_size"] == 32 and written["resize"] == 32
    assert set(written["results"]) == {"5", "10", "24"}
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in written["results"].values())
    train_features = torch.load(dump / "trainfeat.pth")
    assert train_features.shape == (24, 192)
    torch.testing.assert_close(train_features.norm(dim=1), torch.ones(24))


def test_eval_knn_writes_next_to_the_checkpoint(tmp_path):
    import eval_knn

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=32, depth=2)
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    checkpoint.parent.mkdir()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, checkpoint)
    results = eval_knn.main(_knn_argv(tmp_path, "--pretrained_weights", str(checkpoint)))
    written = json.loads((tmp_path / "run" / "eval_knn_synthetic.json").read_text())
    assert written["pretrained_weights"] == str(checkpoint) and written["checkpoint_key"] == "teacher"
    assert written["results"] == json.loads(json.dumps(results["results"]))


def test_eval_knn_reads_the_architecture_from_the_checkpoint(tmp_path):
    import eval_knn

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=32, depth=2)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, checkpoint)
    argv = _knn_argv(
        tmp_path, "--pretrained_weights", str(checkpoint), "--output_json", str(tmp_path / "r.json")
    )
    assert argv[:2] == ["--arch", "vit_tiny"]
    results = eval_knn.main(argv[2:])  # no --arch: the weights' shapes say ViT-Tiny/16
    assert results["arch"] == "vit_tiny" and results["patch_size"] == 16
