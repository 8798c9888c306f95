"""Released ViT key layouts that name the same parameters differently, renamed to this repository's.

The ViT of :mod:`models.vision_transformer` uses DINO's names, extended with dinov2's for LayerScale,
registers and SwiGLU. Three other layouts hold the same networks under other names or shapes:

- Layer scale of iBOT's, DINO's and BEiT's code: ``blocks.i.gamma_1`` / ``gamma_2`` are read as
  ``blocks.i.ls1.gamma`` / ``ls2.gamma``.
- timm's ``no_embed_class`` (its dinov2 with registers, DeiT-3): ``reg_token`` (1, R, D) is read as
  ``register_tokens``, and ``pos_embed`` (1, N, D), which has no [CLS] row, gets a zero [CLS] row first.
- timm's packed SwiGLU (its dinov2 ViT-g): ``blocks.i.mlp.fc1`` (2H, D) / ``mlp.fc2`` (D, H) are read as
  ``blocks.i.mlp.w12`` / ``mlp.w3``.

Why the renamed file is the same network: ``gamma_k`` multiplies the same branch as ``lsk.gamma``. timm's
``no_embed_class`` adds the positional embedding to the patch tokens only, which equals a zero [CLS]
row (registers never get one in either layout, and both order the tokens [CLS], registers, patches).
timm's packed SwiGLU computes ``fc2(SiLU(a) * b)`` with ``[a, b] = fc1(x)`` split in halves, dinov2's
``w3(SiLU(a) * b)`` with ``[a, b] = w12(x)``; a GELU MLP has ``fc1`` rows equal to ``fc2`` columns, so
the two are told apart by their shapes. Every entry of the file is kept, so the load stays strict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

_LAYER_SCALE = re.compile(r"(blocks\.\d+)\.gamma_([12])$")
_MLP_FC1 = re.compile(r"(blocks\.\d+)\.mlp\.fc1\.weight$")


def _is_vit(state_dict: Mapping[str, Tensor]) -> bool:
    proj = state_dict.get("patch_embed.proj.weight")
    return "cls_token" in state_dict and proj is not None and proj.ndim == 4


def _packed_swiglu_blocks(state_dict: Mapping[str, Tensor]) -> set[str]:
    """The ``blocks.i`` whose ``mlp.fc1`` has twice as many rows as ``mlp.fc2`` has columns."""
    packed = set()
    for key, value in state_dict.items():
        match = _MLP_FC1.match(key)
        fc2 = state_dict.get(f"{match.group(1)}.mlp.fc2.weight") if match else None
        if match and fc2 is not None and value.ndim == 2 and value.shape[0] == 2 * fc2.shape[1]:
            packed.add(match.group(1))
    return packed


def to_model_key_layout(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename the layouts of the module table to this repository's ViT names (other files pass unchanged).

    Args:
        state_dict: a backbone state dict without wrapper prefixes.
    Returns:
        ``(renamed, conversions)``: the state dict in this repository's layout and one line per layout
        that was converted (empty when none was).
    """
    if not _is_vit(state_dict):
        return dict(state_dict), []
    conversions: list[str] = []
    renamed: dict[str, Tensor] = {}
    packed = _packed_swiglu_blocks(state_dict)
    for key, value in state_dict.items():
        layer_scale = _LAYER_SCALE.match(key)
        block = key.split(".mlp.")[0] if ".mlp." in key else None
        if layer_scale:
            renamed[f"{layer_scale.group(1)}.ls{layer_scale.group(2)}.gamma"] = value
        elif block in packed and key.startswith(f"{block}.mlp.fc1."):
            renamed[key.replace(".mlp.fc1.", ".mlp.w12.")] = value
        elif block in packed and key.startswith(f"{block}.mlp.fc2."):
            renamed[key.replace(".mlp.fc2.", ".mlp.w3.")] = value
        elif key == "reg_token":
            renamed["register_tokens"] = value
        else:
            renamed[key] = value
    if any(_LAYER_SCALE.match(key) for key in state_dict):
        conversions.append("layer scale gamma_1 / gamma_2 read as ls1.gamma / ls2.gamma")
    if packed:
        conversions.append("timm's packed SwiGLU mlp.fc1 / mlp.fc2 read as mlp.w12 / mlp.w3")
    if "reg_token" in state_dict:
        conversions.append("timm's reg_token read as register_tokens")
    pos_embed = renamed.get("pos_embed")
    if (
        pos_embed is not None
        and pos_embed.ndim == 3
        and math.isqrt(pos_embed.shape[1]) ** 2 == pos_embed.shape[1]
    ):
        zero_row = torch.zeros_like(pos_embed[:, :1])
        renamed["pos_embed"] = torch.cat((zero_row, pos_embed), dim=1)
        conversions.append("pos_embed without a [CLS] row (timm's no_embed_class) given a zero [CLS] row")
    return renamed, conversions
