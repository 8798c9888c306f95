"""dinov2 and timm ViTs: LayerScale, registers, SwiGLU, patch 14, their key layouts, and the evaluations.

The reference is timm's own implementation of the same models (``vit_small_patch14_dinov2``,
``vit_small_patch14_reg4_dinov2``, ``vit_small_patch16_224.dino``, ``vit_giant_patch14_dinov2``), built
with random weights at reduced depth and input size. Files are written in dinov2's released layout
(``register_tokens``, a [CLS] row in ``pos_embed``, ``mask_token``; obtained from timm's by inverting
timm's own dinov2 conversion) and in timm's layout (``reg_token``, no [CLS] row), and must load strictly
into networks whose [CLS], patch and register tokens equal timm's to 1e-5 at two input sizes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn

from cribo_utils.weights import checkpoint_formats as cf
from cribo_utils.weights.architecture_detection import detect_architecture
from cribo_utils.weights.vit_key_layouts import to_model_key_layout
from models.vision_transformer import VisionTransformer, vit_giant

DEPTH = 2
REGISTERS = 4


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter (norms around 1), so that no term of the parity is trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = name.endswith("weight") and param.ndim == 1 and "norm" in name
            param.copy_(1.0 + 0.2 * noise if is_norm else 0.1 * noise)
    return model.eval()


def _timm(name: str, img_size: int, seed: int, **kwargs) -> TimmVisionTransformer:
    model = timm.create_model(
        name, pretrained=False, img_size=img_size, depth=DEPTH, num_classes=0, dynamic_img_size=True, **kwargs
    )
    for block in model.blocks:
        block.attn.fused_attn = False
    return _randomise(model, seed)


def _dinov2_release_layout(timm_state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """dinov2's released key layout, from timm's: the inverse of timm's ``_convert_dinov2``.

    timm folds dinov2's [CLS] position into ``cls_token`` and drops it from ``pos_embed`` for register
    models; here a random [CLS] position r is split off again (cls = timm_cls - r, pos_embed = [r, ...]).
    """
    state = dict(timm_state)
    if "reg_token" in state:
        cls_position = 0.1 * torch.randn(
            state["cls_token"].shape, generator=torch.Generator().manual_seed(seed)
        )
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat((cls_position, state["pos_embed"]), dim=1)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])  # dinov2's training-only mask token
    return state


def _timm_tokens(model: TimmVisionTransformer, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        tokens = model.forward_features(images)
    prefix = model.num_prefix_tokens
    return tokens[:, 0], tokens[:, prefix:], tokens[:, 1:prefix]


def _assert_matches_timm(ours: VisionTransformer, reference: TimmVisionTransformer, images: Tensor) -> None:
    cls, patches, registers = _timm_tokens(reference, images)
    with torch.no_grad():
        our_cls, our_patches = ours.forward_features(images)
        our_registers = ours.forward_register_tokens(images)
        pooled = ours(images)
    grid = (images.shape[-2] // ours.patch_size) * (images.shape[-1] // ours.patch_size)
    assert our_patches.shape == (images.shape[0], grid, ours.embed_dim)
    torch.testing.assert_close(our_cls, cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_patches, patches, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_registers, registers, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, our_cls, atol=0, rtol=0)


def _images(height: int, width: int, seed: int = 0) -> Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _save(state: dict[str, Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------------
# dinov2 with and without registers, timm's DINO ViT: timm parity at two input sizes


@pytest.mark.parametrize("layout", ["dinov2", "timm"])
def test_dinov2_with_registers_matches_timm_at_two_sizes(layout, tmp_path) -> None:
    reference = _timm("vit_small_patch14_reg4_dinov2", 56, seed=1)
    state = reference.state_dict()
    if layout == "dinov2":
        state = _dinov2_release_layout(state, seed=2)
    ours = cf.build_pretrained_backbone("vit_small", 14, _save(state, tmp_path / "reg.pth"))
    assert ours.num_register_tokens == REGISTERS and ours.img_size == 56 and ours.depth == DEPTH
    assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.0, True)  # dinov2 "_reg", as timm
    _assert_matches_timm(ours, reference, _images(56, 56))
    _assert_matches_timm(ours, reference, _images(84, 70))


@pytest.mark.parametrize(
    ("timm_name", "patch", "native", "other"),
    [("vit_small_patch14_dinov2", 14, 56, (84, 70)), ("vit_small_patch16_224.dino", 16, 64, (96, 80))],
)
def test_dinov2_and_dino_without_registers_match_timm_at_two_sizes(timm_name, patch, native, other, tmp_path):
    """Without registers dinov2 and DINO resize the positions by DINO's scale factors (+0.1), timm by the
    output size with antialiasing: at the second size the model is set to timm's recipe for the parity,
    and its own recipe is checked against dinov2's code in the next test."""
    reference = _timm(timm_name, native, seed=3)
    state = reference.state_dict()
    if patch == 14:
        state = _dinov2_release_layout(state, seed=4)
    ours = cf.build_pretrained_backbone("vit_small", patch, _save(state, tmp_path / "w.pth"))
    assert ours.num_register_tokens == 0 and (ours.interpolate_offset, ours.interpolate_antialias) == (
        0.1,
        False,
    )
    has_layer_scale = patch == 14
    assert isinstance(ours.blocks[0].ls1, nn.Identity) != has_layer_scale
    _assert_matches_timm(ours, reference, _images(native, native))
    ours.interpolate_offset, ours.interpolate_antialias = 0.0, True
    _assert_matches_timm(ours, reference, _images(*other))


def _dinov2_reference_interpolation(
    pos_embed: Tensor, patch_size: int, height: int, width: int, offset: float, antialias: bool
) -> Tensor:
    """dinov2's ``interpolate_pos_encoding`` transcribed (its ``w`` is the image height, as in DINO)."""
    w, h = height, width
    N = pos_embed.shape[1] - 1
    if (w // patch_size) * (h // patch_size) == N and w == h:
        return pos_embed
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    M = int(math.sqrt(N))
    kwargs = {"scale_factor": ((w0 + offset) / M, (h0 + offset) / M)} if offset else {"size": (w0, h0)}
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize(("offset", "antialias"), [(0.1, False), (0.0, True)])
@pytest.mark.parametrize(("height", "width"), [(518, 518), (224, 224), (70, 112), (896, 448), (28, 42)])
def test_interpolation_equals_dinov2_for_both_recipes(offset, antialias, height, width) -> None:
    model = VisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=8,
        depth=1,
        num_heads=2,
        interpolate_offset=offset,
        interpolate_antialias=antialias,
    )
    tokens = torch.zeros(1, 1 + (height // 14) * (width // 14), 8)
    with torch.no_grad():
        ours = model.interpolate_pos_encoding(tokens, height, width)
        reference = _dinov2_reference_interpolation(model.pos_embed, 14, height, width, offset, antialias)
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)


def test_the_two_recipes_differ_so_the_choice_matters() -> None:
    model = VisionTransformer(img_size=56, patch_size=14, embed_dim=8, depth=1, num_heads=2)
    tokens = torch.zeros(1, 1 + 6 * 5, 8)
    with torch.no_grad():
        dino = model.interpolate_pos_encoding(tokens, 84, 70)
        model.interpolate_offset, model.interpolate_antialias = 0.0, True
        antialiased = model.interpolate_pos_encoding(tokens, 84, 70)
    assert (dino - antialiased).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# registers are never mistaken for patch tokens


def test_registers_are_left_out_of_every_evaluation_output(tmp_path) -> None:
    reference = _timm("vit_small_patch14_reg4_dinov2", 56, seed=5)
    ours = cf.build_pretrained_backbone("vit_small", 14, _save(reference.state_dict(), tmp_path / "reg.pth"))
    images = _images(56, 42)
    cls, patches, _ = _timm_tokens(reference, images)
    with torch.no_grad():
        (last,) = ours.get_intermediate_layers(images, 1)
        attention = ours.get_last_selfattention(images)
        tokens = ours.prepare_tokens(images)
        for block in ours.blocks[:-1]:
            tokens = block(tokens)
        full = ours.blocks[-1].self_attention(tokens)  # (B, h, 1 + 4 + 12, 1 + 4 + 12)
    torch.testing.assert_close(last, torch.cat((cls[:, None], patches), dim=1), atol=1e-5, rtol=0)
    keep = [0, *range(1 + REGISTERS, 1 + REGISTERS + 12)]
    assert attention.shape == (2, 6, 13, 13) and full.shape == (2, 6, 17, 17)
    torch.testing.assert_close(attention, full[:, :, keep][:, :, :, keep], atol=0, rtol=0)
    assert (attention.sum(-1) < 1 - 1e-4).any()  # the mass on the registers is left out


def test_the_figures_load_a_register_model_and_draw_patch_attention(tmp_path) -> None:
    from cribo_utils.figures.attention import attention_maps
    from cribo_utils.figures.model import load_figure_model

    reference = _timm("vit_small_patch14_reg4_dinov2", 56, seed=8)
    path = _save(_dinov2_release_layout(reference.state_dict(), seed=9), tmp_path / "reg.pth")
    figure_model = load_figure_model(str(path))
    assert figure_model.backbone.num_register_tokens == REGISTERS and figure_model.image_size == 56
    maps = attention_maps(figure_model.backbone, _images(56, 56))
    assert maps.shape == (2, 6, 4, 4)


# ---------------------------------------------------------------------------------------------------
# SwiGLU (dinov2 ViT-g), LayerScale under gamma_1 / gamma_2, mean-pooled ViTs, other block layouts


def test_swiglu_and_layer_scale_match_timm_at_two_sizes(tmp_path) -> None:
    """timm's packed SwiGLU at ViT-Tiny width (ViT-g's layout, small enough to run): loads as w12 / w3."""
    reference = TimmVisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=192,
        depth=DEPTH,
        num_heads=3,
        num_classes=0,
        init_values=1e-5,
        mlp_ratio=2.66667 * 2,
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
        dynamic_img_size=True,
    )
    for block in reference.blocks:
        block.attn.fused_attn = False
    _randomise(reference, seed=6)
    ours = cf.build_pretrained_backbone("vit_tiny", 14, _save(reference.state_dict(), tmp_path / "g.pth"))
    assert "blocks.0.mlp.w12.weight" in ours.state_dict() and ours.blocks[0].mlp.w3.in_features == 512
    _assert_matches_timm(ours, reference, _images(56, 56))
    ours.interpolate_offset, ours.interpolate_antialias = 0.0, True
    _assert_matches_timm(ours, reference, _images(42, 84))


def test_dinov2_giant_layouts_are_recognised_and_fit_vit_giant() -> None:
    """ViT-g/14 (1.1 B parameters): timm's packed layout and dinov2's w12 / w3, on the meta device."""
    with torch.device("meta"):
        timm_giant = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0)
        ours = vit_giant(img_size=518, layer_scale_init=1.0)
    renamed, conversions = to_model_key_layout(timm_giant.state_dict())
    assert conversions == ["timm's packed SwiGLU mlp.fc1 / mlp.fc2 read as mlp.w12 / mlp.w3"]
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    detected = detect_architecture(renamed)
    assert (detected.arch, detected.patch_size, detected.ffn_layer, detected.ffn_hidden_dim) == (
        "vit_giant",
        14,
        "swiglu",
        4096,
    )
    assert detected.layer_scale and detected.description == "ViT-giant/14 with LayerScale, SwiGLU MLP"
    assert ours.blocks[0].mlp.w12.out_features == 8192 and len(ours.blocks) == 40


def test_layer_scale_under_gamma_1_and_gamma_2_loads(tmp_path) -> None:
    """iBOT's and DINO's code name layer scale blocks.i.gamma_1 / gamma_2; the file loads strictly."""
    reference = TimmVisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=DEPTH, num_heads=3, num_classes=0, init_values=0.1
    )
    for block in reference.blocks:
        block.attn.fused_attn = False
    _randomise(reference, seed=7)
    renamed = {
        key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): value
        for key, value in reference.state_dict().items()
    }
    assert "blocks.1.gamma_2" in renamed
    path = _save({"state_dict": renamed}, tmp_path / "ibot_layer_scale.pth")
    assert cf.resolve_architecture(path) == ("vit_tiny", 16)
    _assert_matches_timm(cf.build_pretrained_backbone("vit_tiny", 16, path), reference, _images(64, 64))


def test_a_mean_pooled_vit_is_refused_naming_that_cause(tmp_path) -> None:
    timm_model = TimmVisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0, global_pool="avg"
    )
    path = _save(timm_model.state_dict(), tmp_path / "mae_like.pth")
    assert cf.resolve_architecture(path) == ("vit_tiny", 16)  # arch and patch size are right
    with pytest.raises(cf.CheckpointFormatError) as info:
        cf.build_pretrained_backbone("vit_tiny", 16, path)
    message = str(info.value)
    assert "mean-pooled ViT (fc_norm" in message and "does not load" in message
    assert "check --arch" not in message and "\n" not in message


def test_an_unknown_block_layout_does_not_blame_arch_and_patch_size(tmp_path) -> None:
    """A ViT whose blocks have parameters this repository lacks (timm's qk_norm): the embeddings load."""
    timm_model = TimmVisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0, qk_norm=True
    )
    path = _save(timm_model.state_dict(), tmp_path / "qk_norm.pth")
    with pytest.raises(cf.CheckpointFormatError) as info:
        cf.build_pretrained_backbone("vit_tiny", 16, path)
    message = str(info.value)
    assert "blocks.0.attn.q_norm.weight" in message and "--arch and --patch_size fit" in message


# ---------------------------------------------------------------------------------------------------
# The three evaluations on dinov2 ViT-S/14 with and without registers and on timm's DINO ViT-S/16


EVAL_CASES = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", 14, 56, "dinov2"),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", 14, 56, "dinov2"),
    "timm_dino_vits16": ("vit_small_patch16_224.dino", 16, 64, "timm"),
}


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, tuple[Path, TimmVisionTransformer]]:
    root = tmp_path_factory.mktemp("vit_releases")
    files = {}
    for index, (name, (timm_name, _, size, layout)) in enumerate(EVAL_CASES.items()):
        reference = _timm(timm_name, size, seed=10 + index)
        state = reference.state_dict()
        if layout == "dinov2":
            state = _dinov2_release_layout(state, seed=20 + index)
        files[name] = (_save(state, root / f"{name}.pth"), reference)
    return files


def _classification_argv(weights: Path, size: int, output: Path) -> list[str]:
    argv = ["--pretrained_weights", str(weights), "--synthetic_num_train", "8", "--synthetic_num_val", "4"]
    argv += ["--image_size", str(size), "--batch_size_per_gpu", "4", "--num_workers", "0"]
    return [*argv, "--output_json", str(output)]


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_knn_features_are_the_reference_cls_tokens(name, eval_files, tmp_path) -> None:
    import eval_knn
    from cribo_utils.eval.features import build_classification_split, resolve_image_sizes
    from cribo_utils.eval.knn import get_args_parser
    from data.transforms import eval_transform

    path, reference = eval_files[name]
    _, patch, size, _ = EVAL_CASES[name]
    argv = _classification_argv(path, size, tmp_path / "knn.json")
    argv += ["--nb_knn", "2", "--dump_features", str(tmp_path / "features")]
    results = eval_knn.main(argv)
    assert (
        results["arch"] == "vit_small" and results["patch_size"] == patch and "[CLS]" in results["protocol"]
    )
    dumped = torch.load(tmp_path / "features" / "trainfeat.pth", weights_only=True)
    args = get_args_parser().parse_args(argv)
    resize, crop = resolve_image_sizes(args)
    train_set = build_classification_split(args, "train", eval_transform(resize=resize, crop=crop))
    cls, _, _ = _timm_tokens(reference, torch.stack([train_set[i][0] for i in range(len(train_set))]))
    torch.testing.assert_close(dumped, F.normalize(cls, dim=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_linear_probe_runs(name, eval_files, tmp_path) -> None:
    import eval_linear

    path, _ = eval_files[name]
    argv = _classification_argv(path, EVAL_CASES[name][2], tmp_path / "linear.json")
    results = eval_linear.main(
        [*argv, "--epochs", "1", "--n_last_blocks", "1", "--avgpool_patchtokens", "true"]
    )
    assert results["feature_dim"] == 2 * 384 and results["arch"] == "vit_small"
    assert 0.0 <= results["last_top1"] <= 100.0


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_dense_nn_uses_the_patch_tokens_only(name, eval_files, tmp_path) -> None:
    import eval_dense_nn

    path, _ = eval_files[name]
    _, patch, size, _ = EVAL_CASES[name]
    argv = [
        "--pretrained_weights",
        str(path),
        "--synthetic_image_size",
        str(size),
        "--synthetic_num_train",
        "4",
    ]
    argv += ["--synthetic_num_val", "2", "--batch_size_per_gpu", "2", "--num_workers", "0"]
    argv += ["--augmentation_epochs", "1", "--num_neighbours", "3", "--no_progress"]
    results = eval_dense_nn.main([*argv, "--output_json", str(tmp_path / "dense.json")])
    grid = (size // patch) ** 2  # 16 patch tokens per image; the 4 registers are not among them
    assert results["patch_size"] == patch and results["patches_per_image"] == grid
    assert results["memory_entries"] == 4 * grid and 0.0 <= results["miou"] <= 1.0
