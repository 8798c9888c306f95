"""Tests for cribo_utils/figures/: colour helpers, PCA, bank bookkeeping and every figure end to end.

Figures are produced on tiny inputs (vit_tiny with 2 blocks, 32-64 px, a few images) and checked to be
PNG files of the exact expected pixel size that are not blank.
"""

from __future__ import annotations

import colorsys
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cribo_utils import figures as viz
from models import build_backbone

PATCH = 16
DPI = 30


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=PATCH, depth=2)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    return viz.synthetic_images(6, split="val", image_size=64)


def assert_figure(path: Path, expected_size: tuple[int, int]) -> None:
    """A valid PNG of exactly ``expected_size`` pixels with real content (not one flat colour)."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == expected_size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10.0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def write_image_folder(root: Path) -> Path:
    """Images of mixed sizes, modes and formats, a sub-folder, a hidden file and a non-image file."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), mode="L").save(root / "c.bmp")
    Image.fromarray(rng.integers(0, 256, (48, 48, 4), dtype=np.uint8), mode="RGBA").save(root / "d.png")
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(root / "sub" / "e.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root


def tiny_args(*extra: str) -> list[str]:
    return ["--arch", "vit_tiny", "--depth", "2", "--dpi", str(DPI), *extra]


# --------------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------------


def test_cluster_palette_hand_values_distinct_and_never_grey() -> None:
    palette = viz.cluster_palette(64)
    assert palette.shape == (64, 3) and palette.dtype == np.uint8
    # k = 0: hue 0, saturation 0.8, value 0.95 -> (0.95, 0.19, 0.19) * 255 = (242, 48, 48).
    assert palette[0].tolist() == [242, 48, 48]
    expected_1 = np.round(np.asarray(colorsys.hsv_to_rgb(0.618034, 0.8, 0.7)) * 255).astype(int)
    assert palette[1].tolist() == expected_1.tolist()
    assert len(np.unique(palette, axis=0)) == 64
    assert not (palette == np.asarray(viz.INVALID_CLUSTER_COLOUR)).all(axis=1).any()
    with pytest.raises(ValueError, match="n_tokens"):
        viz.cluster_palette(0)


def test_colour_cluster_labels_same_colour_in_both_views_and_grey_for_invalid() -> None:
    n_clusters = 5
    valid = np.array([True, False, True, True, False])
    view1 = np.array([[0, 0, 1], [2, 2, 3], [3, 0, 4]])
    view2 = np.array([[3, 3, 2], [0, 2, 2], [1, 0, 0]])
    palette = viz.cluster_palette(n_clusters)
    colours = viz.colour_cluster_labels(np.stack([view1, view2]), valid)
    assert colours.shape == (2, 3, 3, 3)
    grey = np.asarray(viz.INVALID_CLUSTER_COLOUR)
    # Slow reference, pixel by pixel.
    for view, labels in enumerate((view1, view2)):
        for i in range(3):
            for j in range(3):
                k = labels[i, j]
                expected = palette[k] if valid[k] else grey
                assert colours[view, i, j].tolist() == expected.tolist()
    # Cluster 0 and cluster 2 look the same in both views; torch inputs give the same result.
    assert (colours[0][view1 == 2] == colours[1][view2 == 2][0]).all()
    torch_colours = viz.colour_cluster_labels(torch.from_numpy(view1), torch.from_numpy(valid))
    assert np.array_equal(torch_colours, colours[0])


def test_colour_cluster_labels_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        viz.colour_cluster_labels(np.array([0, 2]), np.array([True, True]))
    with pytest.raises(ValueError, match="palette"):
        viz.colour_cluster_labels(np.array([0]), np.array([True]), palette=np.zeros((2, 3), np.uint8))


def test_dataset_palettes() -> None:
    voc = viz.dataset_palette("voc")
    assert voc.shape == (256, 3)
    assert (
        voc[0].tolist() == [0, 0, 0]
        and voc[1].tolist() == [128, 0, 0]
        and voc[15].tolist() == [192, 128, 128]
    )
    assert voc[255].tolist() == list(viz.IGNORE_COLOUR)
    assert np.array_equal(viz.dataset_palette("synthetic"), voc)
    ade = viz.dataset_palette("ade20k")
    assert np.array_equal(ade, viz.dataset_palette("ade20k"))  # fixed, not redrawn
    assert ade[255].tolist() == list(viz.IGNORE_COLOUR)
    assert not np.array_equal(ade, voc)
    with pytest.raises(ValueError, match="--dataset"):
        viz.dataset_palette("coco")
    mask = np.array([[0, 1], [255, 1]])
    assert viz.colourise_mask(mask, voc).tolist() == [
        [[0, 0, 0], [128, 0, 0]],
        [list(viz.IGNORE_COLOUR), [128, 0, 0]],
    ]


def test_patch_grid_helpers_hand_values() -> None:
    grid = np.array([[1, 2], [3, 4]])
    up = viz.upsample_patch_grid(grid, 2)
    assert up.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    edges = viz.label_boundaries(np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]]))
    assert edges.tolist() == [[False, True, False], [True, True, True], [False, False, False]]
    image = np.full((1, 1, 3), 100, np.uint8)
    assert viz.blend(image, np.full((1, 1, 3), 200, np.uint8), 0.25).tolist() == [[[125, 125, 125]]]


def test_denormalize_inverts_imagenet_normalisation() -> None:
    from data.transforms import normalize

    picture = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    tensor = normalize()(Image.fromarray(picture))
    assert np.array_equal(viz.denormalize(tensor), picture)
    assert viz.denormalize(tensor[None]).shape == (1, 8, 8, 3)


# --------------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------------


def _reference_pca_rgb(features: np.ndarray) -> np.ndarray:
    """Slow reference: SVD of the centred data, largest-|entry|-positive signs, per-channel min-max."""
    flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((flat.shape[0], 3))
    for c in range(3):
        component = vt[c]
        if component[np.argmax(np.abs(component))] < 0:
            component = -component
        y = centred @ component
        out[:, c] = (y - y.min()) / (y.max() - y.min())
    return out.reshape(*features.shape[:-1], 3)


def test_pca_rgb_matches_svd_reference() -> None:
    rng = np.random.default_rng(1)
    scales = np.array([5.0, 3.0, 2.0, 0.5, 0.3, 0.2, 0.1, 0.05])  # well-separated variances
    features = rng.normal(size=(3, 20, 8)) * scales + rng.normal(size=8)
    rgb = viz.pca_rgb(torch.from_numpy(features).float())
    assert rgb.shape == (3, 20, 3) and rgb.dtype == torch.float32
    np.testing.assert_allclose(rgb.numpy(), _reference_pca_rgb(features), atol=1e-4)
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0


def test_pca_rgb_hand_values_on_a_line() -> None:
    # Tokens x_t = (2 + t) e_0 + (5, 5, 5, 5), t = 0..4: all variance lies along e_0, so channel 0 is
    # t / 4 and the other channels have zero range (0.5).
    t = torch.arange(5, dtype=torch.float32)
    features = torch.zeros(1, 5, 4)
    features[0, :, 0] = 2.0 + t
    features += 5.0
    rgb = viz.pca_rgb(features)[0]
    np.testing.assert_allclose(rgb[:, 0].numpy(), [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(rgb[:, 1:].numpy(), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="B, N, D"):
        viz.pca_rgb(torch.zeros(5, 4))


# --------------------------------------------------------------------------------------------------
# clustering and the on-the-fly memory bank
# --------------------------------------------------------------------------------------------------


def test_cluster_image_views_valid_labels_and_objects_agree(backbone: torch.nn.Module, scenes: list) -> None:
    views = viz.cluster_image_views(backbone, scenes[:3], image_size=48, n_clusters=4, pos_alpha=1.0, seed=3)
    assert views.pictures.shape == (3, 2, 48, 48, 3)
    assert views.labels1.shape == (3, 3, 3) and views.labels2.shape == (3, 3, 3)
    for b in range(3):
        for k in range(4):
            in_both = bool((views.labels1[b] == k).any() and (views.labels2[b] == k).any())
            assert bool(views.valid[b, k]) == in_both
    # Objects: mean of each view's tokens over the cluster's members, image by image, cluster ascending.
    expected1, expected2, ids = [], [], []
    for b in range(3):
        for k in range(4):
            if views.valid[b, k]:
                expected1.append(views.tokens1[b][views.labels1[b].flatten() == k].mean(0))
                expected2.append(views.tokens2[b][views.labels2[b].flatten() == k].mean(0))
                ids.append([b, k])
    torch.testing.assert_close(views.objects1, torch.stack(expected1))
    torch.testing.assert_close(views.objects2, torch.stack(expected2))
    assert views.object_ids.tolist() == ids
    # Deterministic for a seed, and the caller's RNG is left alone.
    state = torch.get_rng_state()
    again = viz.cluster_image_views(backbone, scenes[:3], image_size=48, n_clusters=4, pos_alpha=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.labels1, views.labels1) and np.array_equal(again.pictures, views.pictures)


def test_two_views_positions_match_crop_boxes(scenes: list) -> None:
    from data.augmentations import patch_centre_coordinates

    _, _, positions1, positions2, pictures, boxes = viz.make_two_views(scenes[:2], 32, PATCH, seed=0)
    assert pictures.shape == (2, 2, 32, 32, 3) and pictures.dtype == np.uint8
    for b in range(2):
        for positions, (box, flipped) in zip((positions1[b], positions2[b]), boxes[b], strict=True):
            expected = patch_centre_coordinates(box.top, box.left, box.height, box.width, 32, PATCH, flipped)
            torch.testing.assert_close(positions, expected)


def test_build_object_bank_maps_slots_back_to_their_objects(backbone: torch.nn.Module, scenes: list) -> None:
    memory = viz.build_object_bank(backbone, scenes[:4], image_size=48, n_clusters=4, pos_alpha=1.0, seed=1)
    views = memory.views
    assert memory.bank.num_images == 4
    assert memory.bank.num_objects == int(views.valid.sum())
    slots = memory.bank.valid_slots()
    images, clusters = memory.locate(slots)
    for slot, image, cluster in zip(slots.tolist(), images.tolist(), clusters.tolist(), strict=True):
        assert views.valid[image, cluster]
        for view, tokens, labels in ((1, views.tokens1, views.labels1), (2, views.tokens2, views.labels2)):
            members = labels[image].flatten() == cluster
            stored = memory.bank.gather_slots(view, torch.tensor([slot]))[0]
            torch.testing.assert_close(stored, tokens[image][members].mean(0))
    unused = torch.ones(memory.bank.capacity, dtype=torch.bool)
    unused[slots] = False
    assert (memory.slot_image[unused] == -1).all()


# --------------------------------------------------------------------------------------------------
# attention maps
# --------------------------------------------------------------------------------------------------


def test_attention_maps_are_the_cls_rows_on_the_patch_grid(backbone: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 32, 48)
    maps = viz.attention_maps(backbone, images)
    attention = backbone.get_last_selfattention(images)
    assert maps.shape == (2, 3, 2, 3)
    for b in range(2):
        for head in range(3):
            for i in range(2):
                for j in range(3):
                    assert maps[b, head, i, j] == attention[b, head, 0, 1 + i * 3 + j]
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + attention[:, :, 0, 0], torch.ones(2, 3))


# --------------------------------------------------------------------------------------------------
# figures from Python
# --------------------------------------------------------------------------------------------------


def test_plot_clusters(backbone: torch.nn.Module, scenes: list, tmp_path: Path) -> None:
    path = viz.plot_clusters(backbone, scenes[:2], tmp_path / "c.png", image_size=48, n_clusters=4, dpi=DPI)
    assert path == tmp_path / "c.png"
    assert_figure(path, viz.grid_pixel_size(2, 3, viz.IMAGE_PANEL, DPI))


def test_plot_clusters_with_photometric_views(
    backbone: torch.nn.Module, scenes: list, tmp_path: Path
) -> None:
    path = viz.plot_clusters(backbone, scenes[:1], tmp_path / "p.png", 32, 2, photometric=True, dpi=DPI)
    assert_figure(path, viz.grid_pixel_size(1, 3, viz.IMAGE_PANEL, DPI))


def test_plot_neighbours(backbone: torch.nn.Module, scenes: list, tmp_path: Path) -> None:
    queries, bank = scenes[:2], scenes[2:6]
    path = viz.plot_neighbours(
        backbone,
        queries,
        bank,
        tmp_path / "n.png",
        image_size=48,
        n_clusters=4,
        objects_per_image=2,
        seed=0,
        dpi=DPI,
    )
    shown = viz.cluster_image_views(backbone, queries, 48, 4, 1.0, seed=0)
    rows = int(shown.valid.sum(dim=1).clamp(max=2).sum())
    assert_figure(path, viz.grid_pixel_size(rows, 4, viz.IMAGE_PANEL, DPI))


def test_plot_dense_with_and_without_ground_truth(backbone: torch.nn.Module, tmp_path: Path) -> None:
    from data.synthetic import NUM_SEG_CLASSES, SEG_CLASS_NAMES, SyntheticSegmentation

    memory = SyntheticSegmentation("train", image_size=64, num_train=3, num_val=2)
    validation = SyntheticSegmentation("val", image_size=64, num_train=3, num_val=2)
    images = [validation[0][0], validation[1][0]]
    masks = [np.asarray(validation[0][1]), None]
    path = viz.plot_dense(
        backbone,
        memory,
        images,
        masks,
        tmp_path / "d.png",
        NUM_SEG_CLASSES,
        viz.dataset_palette("synthetic"),
        SEG_CLASS_NAMES,
        image_size=32,
        num_neighbours=5,
        dpi=DPI,
    )
    assert_figure(path, viz.grid_pixel_size(2, 4, viz.IMAGE_PANEL, DPI))
    with pytest.raises(ValueError, match="masks"):
        viz.plot_dense(
            backbone,
            memory,
            images,
            masks[:1],
            tmp_path / "x.png",
            NUM_SEG_CLASSES,
            viz.dataset_palette("synthetic"),
        )


def test_plot_attention(backbone: torch.nn.Module, scenes: list, tmp_path: Path) -> None:
    path = viz.plot_attention(backbone, scenes[:2], tmp_path / "a.png", image_size=48, dpi=DPI)
    assert_figure(path, viz.grid_pixel_size(2, 3 + 2, viz.IMAGE_PANEL, DPI))  # image + 3 heads + PCA
    with pytest.raises(ValueError, match="--image_size 40"):
        viz.plot_attention(backbone, scenes[:1], tmp_path / "b.png", image_size=40)


def test_plot_attention_of_a_conv_net_says_it_has_none(
    scenes: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ResNet-50 has no attention: the figure says so and draws the image and the PCA panel only."""
    from models import build_eval_backbone

    resnet = build_eval_backbone("resnet50").eval().requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="cribo_utils.figures.attention"):
        path = viz.plot_attention(resnet, scenes[:2], tmp_path / "a.png", image_size=64, dpi=DPI)
    assert_figure(path, viz.grid_pixel_size(2, 2, viz.IMAGE_PANEL, DPI))
    assert "conv net: it has no attention maps" in caplog.text


def test_load_figure_model_recognises_a_conv_checkpoint(tmp_path: Path) -> None:
    from models import build_eval_backbone

    torch.manual_seed(0)
    resnet = build_eval_backbone("resnet50").eval()
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(resnet.state_dict(), path)
    model = viz.load_figure_model(str(path))
    assert (model.arch, model.patch_size, model.image_size) == ("resnet50", 32, 224)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.backbone(images), resnet(images))


# --------------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------------


def write_log(path: Path, iterations: int = 30, per_epoch: int = 10) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        for it in range(1, iterations + 1):
            record = {
                "iteration": it,
                "epoch": (it - 1) // per_epoch,
                "loss": 12.0 - 0.1 * it + rng.random(),
                "loss_img": 4.0 - 0.03 * it,
                "loss_obj": 4.0 - 0.02 * it,
                "loss_nn": 0.0 if it <= per_epoch else 4.0 - 0.01 * it,
                "lr": 1e-3 * it / iterations,
                "wd": 0.04 + 0.01 * it,
                "momentum": 0.996 + 0.0001 * it,
                "clusters_per_image": 3.0 + rng.random(),
                "nn_fraction": 0.01 * it,
                "nn_fraction_2": 0.005 * it,
                "nn_active": float(it > per_epoch),
                "images_per_s": 100.0,
            }
            handle.write(json.dumps(record) + "\n")
            if it % per_epoch == 0:
                handle.write(
                    json.dumps(
                        {
                            "epoch": it // per_epoch - 1,
                            "iteration": it,
                            "epoch_loss": 11.0 - it / 10,
                            "epoch_nn_fraction": 0.1,
                        }
                    )
                    + "\n\n"
                )
    return path


def test_read_training_curves(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.txt")
    curves = viz.read_training_curves(tmp_path)  # the output folder works too
    x, y = curves.steps["loss_img"]
    assert x.tolist() == list(range(1, 31))
    np.testing.assert_allclose(y, [4.0 - 0.03 * it for it in range(1, 31)])
    assert "epoch" not in curves.steps and "iteration" not in curves.steps
    assert "epoch_loss" not in curves.steps
    assert curves.epochs["loss"][0].tolist() == [10, 20, 30]
    np.testing.assert_allclose(curves.epochs["loss"][1], [10.0, 9.0, 8.0])
    assert viz.read_training_curves(log).steps.keys() == curves.steps.keys()


def test_read_training_curves_reads_dinos_epoch_keys(tmp_path: Path) -> None:
    """Epoch records as written now (DINO's train_loss, train_lr, train_wd, epoch) and by earlier versions."""
    lines = [
        {"iteration": 1, "epoch": 0, "loss": 9.0, "lr": 1e-4},
        {"epoch": 0, "iteration": 2, "train_loss": 8.5, "train_lr": 1.5e-4, "train_wd": 0.04},
        {"epoch": 1, "iteration": 4, "epoch_loss": 7.5},
    ]
    (tmp_path / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = viz.read_training_curves(tmp_path)
    assert curves.epochs["loss"][0].tolist() == [2, 4] and curves.epochs["loss"][1].tolist() == [8.5, 7.5]
    assert curves.epochs["lr"][1].tolist() == [1.5e-4] and curves.epochs["wd"][1].tolist() == [0.04]
    assert curves.steps["loss"][1].tolist() == [9.0] and "train_loss" not in curves.steps


def test_read_training_curves_reads_the_iteration_log_beside_log_txt(tmp_path: Path) -> None:
    """Runs write DINO's epoch records to log.txt and the iteration records to log_iterations.txt; the
    folder and its log.txt both read the two, and a run stopped inside its first epoch (no log.txt yet)
    still has curves."""
    steps = [{"iteration": i, "epoch": 0, "loss": 10.0 - i} for i in range(1, 5)]
    (tmp_path / "log_iterations.txt").write_text("".join(json.dumps(line) + "\n" for line in steps))
    only_steps = viz.read_training_curves(tmp_path)
    assert only_steps.steps["loss"][1].tolist() == [9.0, 8.0, 7.0, 6.0] and not only_steps.epochs
    epoch = {"epoch": 0, "iteration": 4, "train_loss": 7.5, "train_lr": 1e-4}
    (tmp_path / "log.txt").write_text(json.dumps(epoch) + "\n")
    for where in (tmp_path, tmp_path / "log.txt"):
        curves = viz.read_training_curves(where)
        assert curves.steps["loss"][0].tolist() == [1, 2, 3, 4]
        assert curves.epochs["loss"][0].tolist() == [4] and curves.epochs["loss"][1].tolist() == [7.5]


def test_read_training_curves_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--log"):
        viz.read_training_curves(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text('{"iteration": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        viz.read_training_curves(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text('{"something": 1}\n')
    with pytest.raises(ValueError, match="iteration"):
        viz.read_training_curves(empty)


def test_moving_average_matches_loop() -> None:
    values = np.random.default_rng(0).normal(size=17)
    for window in (1, 3, 20):
        expected = [values[max(0, t - window + 1) : t + 1].mean() for t in range(17)]
        np.testing.assert_allclose(viz.moving_average(values, window), expected)


def test_plot_curves(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.txt", iterations=250, per_epoch=100)  # long enough to smooth
    path = viz.plot_curves(log, tmp_path / "curves.png", dpi=DPI)
    assert_figure(path, viz.grid_pixel_size(2, 4, viz.CURVE_PANEL, DPI))


def test_plot_curves_with_missing_keys(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"iteration": i, "loss": 10.0 / i}) + "\n" for i in range(1, 6)))
    assert_figure(
        viz.plot_curves(log, tmp_path / "c.png", dpi=DPI), viz.grid_pixel_size(2, 4, viz.CURVE_PANEL, DPI)
    )


# --------------------------------------------------------------------------------------------------
# folders of images and checkpoints, through the command line
# --------------------------------------------------------------------------------------------------


def test_list_image_files(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "photos")
    names = [p.relative_to(root).as_posix() for p in viz.list_image_files(root)]
    assert names == ["a.png", "b.jpg", "c.bmp", "d.png"]
    names = [p.relative_to(root).as_posix() for p in viz.list_image_files(root, recursive=True)]
    assert names == ["a.png", "b.jpg", "c.bmp", "d.png", "sub/e.png"]
    with pytest.raises(ValueError, match="--recursive"):
        viz.list_image_files(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="--images"):
        viz.list_image_files(tmp_path / "nope")
    with pytest.raises(ValueError, match="5 image"):
        viz.load_folder_images(root, count=6, recursive=True)
    loaded = viz.load_folder_images(root, count=2, offset=2)
    assert [image.mode for image in loaded] == ["RGB", "RGB"] and loaded[0].size == (50, 50)


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.md").write_text("no images")
    return folder


def test_cli_figures_on_a_folder_of_images(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "photos")
    out = tmp_path / "figures"
    clusters = viz.main(
        [
            "clusters",
            *tiny_args(
                "--images",
                str(root),
                "--image_size",
                "32",
                "--n_tokens",
                "3",
                "--num_images",
                "2",
                "--out",
                str(out),
            ),
        ]
    )
    assert clusters == out / "clusters.png"
    assert_figure(clusters, viz.grid_pixel_size(2, 3, viz.IMAGE_PANEL, DPI))
    attention = viz.main(
        [
            "attention",
            *tiny_args(
                "--images",
                str(root),
                "--recursive",
                "--image_size",
                "32",
                "--num_images",
                "5",
                "--out",
                str(out / "att.png"),
            ),
        ]
    )
    assert_figure(attention, viz.grid_pixel_size(5, 5, viz.IMAGE_PANEL, DPI))
    neighbours = viz.main(
        [
            "neighbours",
            *tiny_args(
                "--images",
                str(root),
                "--recursive",
                "--image_size",
                "48",
                "--n_tokens",
                "3",
                "--num_images",
                "1",
                "--bank_images",
                "4",
                "--objects_per_image",
                "1",
                "--out",
                str(out),
            ),
        ]
    )
    assert_figure(neighbours, viz.grid_pixel_size(1, 4, viz.IMAGE_PANEL, DPI))
    dense = viz.main(
        [
            "dense",
            *tiny_args(
                "--images",
                str(root),
                "--image_size",
                "32",
                "--num_images",
                "2",
                "--memory_images",
                "2",
                "--synthetic_image_size",
                "32",
                "--num_neighbours",
                "4",
                "--out",
                str(out),
            ),
        ]
    )
    assert_figure(dense, viz.grid_pixel_size(2, 4, viz.IMAGE_PANEL, DPI))
    with pytest.raises(ValueError, match="--images"):
        viz.main(["neighbours", *tiny_args("--images", str(root), "--num_images", "2", "--bank_images", "9")])


def test_cli_dense_with_masks_folder(tmp_path: Path) -> None:
    from data.synthetic import SyntheticSegmentation

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    validation = SyntheticSegmentation("val", image_size=64, num_train=1, num_val=2)
    for index in range(2):
        image, mask = validation[index]
        image.save(images / f"scene{index}.jpg")
        mask.save(masks / f"scene{index}.png")
    path = viz.main(
        [
            "dense",
            *tiny_args(
                "--images",
                str(images),
                "--masks",
                str(masks),
                "--image_size",
                "32",
                "--num_images",
                "2",
                "--memory_images",
                "2",
                "--num_neighbours",
                "3",
                "--out",
                str(tmp_path),
            ),
        ]
    )
    assert_figure(path, viz.grid_pixel_size(2, 4, viz.IMAGE_PANEL, DPI))
    (masks / "scene1.png").unlink()
    with pytest.raises(FileNotFoundError, match="scene1.png"):
        viz.main(
            [
                "dense",
                *tiny_args(
                    "--images",
                    str(images),
                    "--masks",
                    str(masks),
                    "--image_size",
                    "32",
                    "--num_images",
                    "2",
                    "--memory_images",
                    "2",
                    "--out",
                    str(tmp_path),
                ),
            ]
        )


def _training_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in the training layout: DDP student, plain teacher with a head, args dict, queues."""
    torch.manual_seed(1)
    teacher = build_backbone("vit_tiny", patch_size=PATCH, depth=2, img_size=32).state_dict()
    student = {f"module.backbone.{k}": v + 1.0 for k, v in teacher.items()}
    student["module.head.mlp.0.weight"] = torch.zeros(4, 192)
    checkpoint = {
        "student": student,
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.items()},
            "head.mlp.0.weight": torch.zeros(4, 192),
        },
        "args": {
            "arch": "vit_tiny",
            "patch_size": PATCH,
            "depth": 2,
            "image_size": 32,
            "n_tokens": 3,
            "pos_alpha": [2.0, 2.0],
            "synthetic_image_size": 64,
        },
        "centroids_queue_cpu": torch.zeros(2, 3 * 4, 192),
        "cpv_queue_cpu": torch.zeros(4, dtype=torch.long),
        "format_version": 1,
    }
    path = tmp_path / "run" / "checkpoint.pth"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    return path, teacher


def test_load_figure_model_from_training_checkpoint(tmp_path: Path) -> None:
    path, teacher = _training_checkpoint(tmp_path)
    model = viz.load_figure_model(str(path))
    assert (model.arch, model.patch_size, model.depth, model.image_size) == ("vit_tiny", PATCH, 2, 32)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, teacher[key]), key  # the teacher, not the (shifted) student
    assert model.setting("n_tokens") == 3 and model.setting("n_tokens", 5) == 5
    student = viz.load_figure_model(str(path), checkpoint_key="student")
    assert torch.equal(student.backbone.state_dict()["cls_token"], teacher["cls_token"] + 1.0)
    with pytest.raises(ValueError, match="--depth 3"):
        viz.load_figure_model(str(path), depth=3)
    with pytest.raises(ValueError, match="--arch vit_small"):
        viz.load_figure_model(str(path), arch="vit_small")


def test_load_figure_model_bare_backbone_reads_args_json(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = build_backbone("vit_tiny", patch_size=PATCH, depth=2, img_size=64).state_dict()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "teacher_backbone.pth")
    model = viz.load_figure_model(str(run / "teacher_backbone.pth"))
    assert (model.arch, model.depth, model.image_size) == ("vit_tiny", 2, 64)  # read from the weights
    assert model.training_args == {}
    (run / "args.json").write_text(json.dumps({"image_size": 48, "n_tokens": 5}))
    model = viz.load_figure_model(str(run / "teacher_backbone.pth"))
    assert model.image_size == 48 and model.setting("n_tokens") == 5


def test_load_figure_model_random_defaults() -> None:
    preset = viz.load_figure_model()
    assert (preset.arch, preset.patch_size, preset.depth, preset.image_size) == ("vit_tiny", 16, 6, 96)
    small = viz.load_figure_model(arch="vit_tiny", depth=1, seed=5)
    again = viz.load_figure_model(arch="vit_tiny", depth=1, seed=5)
    assert small.depth == 1
    assert torch.equal(small.backbone.pos_embed, again.backbone.pos_embed)
    assert not any(p.requires_grad for p in small.backbone.parameters())


def test_cli_figures_from_a_checkpoint(tmp_path: Path) -> None:
    path, _ = _training_checkpoint(tmp_path)
    common = [
        "--pretrained_weights",
        str(path),
        "--dpi",
        str(DPI),
        "--num_images",
        "2",
        "--out",
        str(tmp_path),
    ]
    clusters = viz.main(["clusters", *common])  # n_tokens 3, image_size 32 and pos_alpha from the checkpoint
    assert_figure(clusters, viz.grid_pixel_size(2, 3, viz.IMAGE_PANEL, DPI))
    attention = viz.main(["attention", *common, "--image_size", "48"])
    assert_figure(attention, viz.grid_pixel_size(2, 5, viz.IMAGE_PANEL, DPI))


def test_cli_curves_and_output_path(tmp_path: Path) -> None:
    write_log(tmp_path / "log.txt")
    path = viz.main(["curves", "--log", str(tmp_path), "--dpi", str(DPI), "--out", str(tmp_path / "figs")])
    assert path == tmp_path / "figs" / "curves.png"
    assert_figure(path, viz.grid_pixel_size(2, 4, viz.CURVE_PANEL, DPI))
    assert viz.output_path("figures", "dense") == Path("figures/dense.png")
    assert viz.output_path("x/y.PNG", "dense") == Path("x/y.PNG")
    with pytest.raises(SystemExit):
        viz.main(["unknown"])


def test_missing_matplotlib_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    """Without matplotlib the CLI exits with the install hint before loading anything; the library raises."""
    import sys

    write_log(tmp_path / "log.txt")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[viz\]"') as error:
        viz.main(["curves", "--log", str(tmp_path), "--out", str(tmp_path / "figs")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "figs").exists()
    with pytest.raises(ModuleNotFoundError, match="optional extra"):
        viz.plot_curves(tmp_path, tmp_path / "curves.png")
