"""Which architecture a backbone state dict's names and shapes fit: ViT, ResNet, ConvNeXt or Swin.

The loader uses this before the strict load, so a file evaluated with the wrong ``--arch`` fails with one
line naming the architecture of its weights (instead of a list of 150 mismatched keys), and files whose
names collide with the ViT's (a ConvNeXt's ``norm.*``, a Swin's ``patch_embed.*``) are recognised for
what they are. Only names and shapes are read; nothing is built.

- ViT (DINO / dinov2 names, after :func:`cribo_utils.weights.vit_key_layouts.to_model_key_layout`):
  ``cls_token`` and ``patch_embed.proj.weight`` (D, 3, p, p); size from D, patch p; LayerScale from
  ``blocks.i.ls1.gamma``, registers from ``register_tokens`` (1, R, D), the MLP kind and width from
  ``blocks.0.mlp.fc1`` (GELU) or ``blocks.0.mlp.w12`` / ``w3`` (SwiGLU), mean pooling from ``fc_norm.*``.
- Swin: ``layers.N.blocks.M.attn.relative_position_bias_table``; size from blocks per stage and width.
- ConvNeXt: VICRegL's ``downsample_layers.0.0.weight`` + ``stages.i.j.dwconv.*``, or timm's ``stem.0.*``
  + ``stages.i.blocks.j.conv_dw.*``; size from blocks per stage and widths.
- ResNet (torchvision names): ``conv1.weight`` (w, 3, 7, 7) + ``layerN.M.conv*``; blocks per stage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)

VIT_WIDTHS: dict[int, str] = {
    192: "vit_tiny",
    384: "vit_small",
    768: "vit_base",
    1024: "vit_large",
    1536: "vit_giant",
}
#: (blocks per stage, widths) -> arch, for ConvNeXt (the sizes of models.convnext.CONVNEXT_SIZES).
CONVNEXT_LAYOUTS: dict[tuple[tuple[int, ...], tuple[int, ...]], str] = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
    ((3, 3, 27, 3), (256, 512, 1024, 2048)): "convnext_xlarge",
}
DISPLAY_NAMES: dict[str, str] = {
    "vit_tiny": "ViT-Tiny",
    "vit_small": "ViT-Small",
    "vit_base": "ViT-Base",
    "vit_large": "ViT-Large",
    "vit_giant": "ViT-giant",
    "convnext_tiny": "ConvNeXt-Tiny",
    "convnext_small": "ConvNeXt-Small",
    "convnext_base": "ConvNeXt-Base",
    "convnext_large": "ConvNeXt-Large",
    "convnext_xlarge": "ConvNeXt-XLarge",
    "resnet50": "ResNet-50",
}
SWIN_SIZES: dict[tuple[tuple[int, ...], int], str] = {
    ((2, 2, 6, 2), 96): "Swin-T",
    ((2, 2, 18, 2), 96): "Swin-S",
    ((2, 2, 18, 2), 128): "Swin-B",
    ((2, 2, 18, 2), 192): "Swin-L",
}


@dataclass(frozen=True)
class DetectedArchitecture:
    """What the weights are.

    Attributes:
        family: ``"vit"``, ``"resnet"``, ``"convnext"``, ``"swin"`` or ``"unknown"``.
        arch: the ``--arch`` the shapes fit (e.g. ``"convnext_small"``), None if this repository has none.
        patch_size: ViT patch size, None otherwise.
        description: human-readable name for messages (e.g. ``"ConvNeXt-Small (VICRegL key names)"``).
        layer_scale: ConvNeXt blocks carry ``gamma``, ViT blocks ``ls1.gamma`` / ``ls2.gamma`` (LayerScale).
        loadable: the key names are those of this repository's model for ``arch`` (False for timm's
            ConvNeXt names, a Swin, a mean-pooled ViT, an unknown layout).
        register_tokens: ViT: number R of register tokens (dinov2 "_reg": 4).
        ffn_layer: ViT: ``"mlp"`` (GELU) or ``"swiglu"``.
        ffn_hidden_dim: ViT: hidden width of the blocks' MLP, None if the file has no block.
        mean_pooled: ViT with ``fc_norm`` (timm's ``global_pool="avg"``, MAE, BEiT): its global feature is
            the normalised mean of the patch tokens, not a final-norm [CLS] token.
    """

    family: str
    arch: str | None
    patch_size: int | None
    description: str
    layer_scale: bool = False
    loadable: bool = True
    register_tokens: int = 0
    ffn_layer: str = "mlp"
    ffn_hidden_dim: int | None = None
    mean_pooled: bool = False

    def flags(self) -> str:
        """The command-line flags that select this architecture (``--arch vit_small --patch_size 16``)."""
        if self.arch is None:
            return ""
        return f"--arch {self.arch}" + (f" --patch_size {self.patch_size}" if self.patch_size else "")

    def vit_options(self) -> dict[str, Any]:
        """The :class:`models.vision_transformer.VisionTransformer` arguments these ViT weights need ({} for
        other families): LayerScale, registers, MLP kind and width, and the positional interpolation of the
        release (dinov2 with registers resizes to the output size with antialiasing; DINO and dinov2
        without registers by DINO's scale factors)."""
        if self.family != "vit":
            return {}
        options: dict[str, Any] = {"num_register_tokens": self.register_tokens, "ffn_layer": self.ffn_layer}
        if self.ffn_hidden_dim is not None:
            options["ffn_hidden_dim"] = self.ffn_hidden_dim
        if self.layer_scale:
            options["layer_scale_init"] = 1.0  # overwritten by the loaded gamma
        if self.register_tokens:
            options.update(interpolate_offset=0.0, interpolate_antialias=True)
        return options


UNKNOWN = DetectedArchitecture("unknown", None, None, "an unrecognised network", loadable=False)


def _stage_depths(state_dict: Mapping[str, Tensor], pattern: str) -> tuple[int, ...]:
    """Blocks per stage: for every key matching ``pattern`` (groups: stage, block), 1 + the largest block."""
    regex = re.compile(pattern)
    blocks: dict[int, int] = {}
    for key in state_dict:
        match = regex.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, -1), block)
    return tuple(blocks[stage] + 1 for stage in sorted(blocks))


def _shape(state_dict: Mapping[str, Tensor], key: str) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    return tuple(value.shape) if value is not None else None


def _detect_vit(state_dict: Mapping[str, Tensor]) -> DetectedArchitecture | None:
    proj = _shape(state_dict, "patch_embed.proj.weight")
    if "cls_token" not in state_dict or proj is None or len(proj) != 4:
        return None
    width, patch = proj[0], proj[-1]
    arch = VIT_WIDTHS.get(width)
    registers = _shape(state_dict, "register_tokens")
    register_tokens = registers[1] if registers and len(registers) == 3 else 0
    layer_scale = any(re.fullmatch(r"blocks\.\d+\.ls1\.gamma", key) for key in state_dict)
    swiglu = _shape(state_dict, "blocks.0.mlp.w3.weight")
    fc1 = _shape(state_dict, "blocks.0.mlp.fc1.weight")
    ffn_hidden_dim = swiglu[1] if swiglu else (fc1[0] if fc1 else None)
    mean_pooled = "fc_norm.weight" in state_dict
    features = [
        *(["LayerScale"] if layer_scale else []),
        *([f"{register_tokens} register tokens"] if register_tokens else []),
        *(["SwiGLU MLP"] if swiglu else []),
        *(["mean pooling (fc_norm, no final norm)"] if mean_pooled else []),
    ]
    name = DISPLAY_NAMES[arch] if arch else f"ViT of width {width}"
    description = f"{name}/{patch}" + (f" with {', '.join(features)}" if features else "")
    return DetectedArchitecture(
        "vit",
        arch,
        patch,
        description,
        layer_scale=layer_scale,
        loadable=arch is not None and not mean_pooled,
        register_tokens=register_tokens,
        ffn_layer="swiglu" if swiglu else "mlp",
        ffn_hidden_dim=ffn_hidden_dim,
        mean_pooled=mean_pooled,
    )


def _detect_swin(state_dict: Mapping[str, Tensor]) -> DetectedArchitecture | None:
    if not any("relative_position_bias_table" in key for key in state_dict):
        return None
    depths = _stage_depths(state_dict, r"layers\.(\d+)\.blocks\.(\d+)\.")
    proj = _shape(state_dict, "patch_embed.proj.weight")
    width = proj[0] if proj else 0
    size = SWIN_SIZES.get((depths, width), f"Swin with {depths} blocks, width {width}")
    return DetectedArchitecture("swin", None, None, f"{size} (Swin Transformer)", loadable=False)


def _detect_convnext(state_dict: Mapping[str, Tensor]) -> DetectedArchitecture | None:
    if "downsample_layers.0.0.weight" in state_dict:
        depths = _stage_depths(state_dict, r"stages\.(\d+)\.(\d+)\.dwconv\.weight")
        widths = tuple(
            int(state_dict[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0])
            for i in range(4)
            if f"downsample_layers.{i}.{0 if i == 0 else 1}.weight" in state_dict
        )
        names, loadable = "VICRegL key names", True
        layer_scale = any(key.endswith(".gamma") for key in state_dict)
    elif "stem.0.weight" in state_dict and any(".conv_dw." in key for key in state_dict):
        depths = _stage_depths(state_dict, r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight")
        widths = tuple(
            int(value.shape[0])
            for key, value in sorted(state_dict.items())
            if re.fullmatch(r"stages\.\d+\.blocks\.0\.conv_dw\.weight", key)
        )
        names, loadable, layer_scale = "timm key names", False, True
    else:
        return None
    arch = CONVNEXT_LAYOUTS.get((depths, widths))
    size = DISPLAY_NAMES[arch] if arch else f"ConvNeXt with {depths} blocks of widths {widths}"
    return DetectedArchitecture(
        "convnext", arch, None, f"{size} ({names})", layer_scale=layer_scale, loadable=loadable and bool(arch)
    )


def _detect_resnet(state_dict: Mapping[str, Tensor]) -> DetectedArchitecture | None:
    stem = _shape(state_dict, "conv1.weight")
    if stem is None or len(stem) != 4 or stem[-1] != 7 or "layer1.0.conv1.weight" not in state_dict:
        return None
    depths = _stage_depths(state_dict, r"layer(\d+)\.(\d+)\.conv1\.weight")
    is_bottleneck = "layer1.0.conv3.weight" in state_dict
    width = stem[0]
    if depths == (3, 4, 6, 3) and is_bottleneck and width == 64:
        return DetectedArchitecture("resnet", "resnet50", None, "ResNet-50 (torchvision key names)")
    kind = "bottleneck" if is_bottleneck else "basic-block"
    return DetectedArchitecture(
        "resnet", None, None, f"ResNet with {depths} {kind} stages, stem width {width}", loadable=False
    )


def detect_architecture(state_dict: Mapping[str, Tensor]) -> DetectedArchitecture:
    """The architecture a stripped backbone state dict fits (see the module table), or ``UNKNOWN``.

    Args:
        state_dict: backbone entries without wrapper prefixes (``module.``, ``backbone.``).
    Returns:
        A :class:`DetectedArchitecture`.
    """
    # Swin before ViT: both have patch_embed.proj.weight; ConvNeXt before ResNet: neither has conv1.
    for detect in (_detect_swin, _detect_vit, _detect_convnext, _detect_resnet):
        found = detect(state_dict)
        if found is not None:
            return found
    return UNKNOWN
