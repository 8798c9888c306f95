"""ResNet-50 backbone with torchvision's parameter names: the layout of DINO's and VICRegL's releases.

DINO's ``dino_resnet50_pretrain.pth`` is torchvision's ``resnet50`` with ``fc`` replaced by an identity,
and VICRegL's ``resnet.py`` keeps torchvision's module names (``conv1``, ``bn1``, ``layer1..4``, each
Bottleneck ``conv1..3`` / ``bn1..3`` / ``downsample.{0,1}``, no ``fc``). Both files therefore load with
``strict=True`` into :class:`ResNetBackbone`, which *is* torchvision's network with ``fc`` removed::

    conv1.weight                      (64, 3, 7, 7)
    bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    layer{1..4}.{i}.conv{1,2,3}.weight / bn{1,2,3}.* / downsample.{0.weight, 1.*}

VICRegL pads the input by 1 with a ``ConstantPad2d`` and then convolves with padding 2; zero padding of
1 followed by zero padding of 2 is zero padding of 3, torchvision's ``conv1``, so the outputs agree.

Backbone interface (shared with the ViTs, see ``models/__init__.py``): ``forward(x)`` is the global
average pool of ``layer4`` (B, 2048), as the releases' linear evaluations use; ``forward_features(x)``
returns it with the dense grid of ``dense_stage`` (``layer4`` at stride 32 by default, ``layer3`` at
stride 16 with ``dense_stage=3``) as (B, N, C) tokens in row-major order. There is no attention map.
"""

from __future__ import annotations

import logging

from einops import rearrange
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

logger = logging.getLogger(__name__)

#: Output channels and stride of each stage (1-based as torchvision's ``layer1..4``).
RESNET50_STAGE_CHANNELS = {1: 256, 2: 512, 3: 1024, 4: 2048}
RESNET50_STAGE_STRIDES = {1: 4, 2: 8, 3: 16, 4: 32}


class ResNetBackbone(ResNet):
    """torchvision ResNet-50 without the classifier, with the backbone interface of the evaluations.

    Args:
        dense_stage: stage (1-4) whose map is the dense feature grid; 4 (stride 32) by default.

    Attributes:
        embed_dim: width of the global feature (2048).
        dense_dim: width of the dense grid (channels of ``dense_stage``).
        patch_size: stride of the dense grid in pixels (the "patch" one token covers).
        has_attention: False; attention figures skip conv nets.
    """

    has_attention = False

    def __init__(self, dense_stage: int = 4) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        if dense_stage not in RESNET50_STAGE_STRIDES:
            raise ValueError(f"ResNet-50: dense_stage must be 1, 2, 3 or 4, got {dense_stage}")
        self.fc = nn.Identity()  # no parameters: the state dict is exactly that of the releases
        self.embed_dim = self.num_features = RESNET50_STAGE_CHANNELS[4]
        self.dense_stage = dense_stage
        self.dense_dim = RESNET50_STAGE_CHANNELS[dense_stage]
        self.patch_size = RESNET50_STAGE_STRIDES[dense_stage]

    def _stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(map of ``dense_stage``, map of ``layer4``), both (B, C, H/s, W/s)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        dense = x
        for index, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            if index == self.dense_stage:
                dense = x
        return dense, x

    def forward(self, x: Tensor) -> Tensor:
        """Global average pool of ``layer4``: (B, 3, H, W) -> (B, 2048)."""
        return self._stages(x)[1].mean(dim=(2, 3))

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(global (B, 2048), dense (B, N, dense_dim)), N = (H/s)(W/s) row-major, s = ``patch_size``."""
        dense, last = self._stages(x)
        return last.mean(dim=(2, 3)), rearrange(dense, "b c h w -> b (h w) c")


def resnet50(dense_stage: int = 4) -> ResNetBackbone:
    """ResNet-50 (torchvision's Bottleneck, [3, 4, 6, 3] blocks), randomly initialised."""
    return ResNetBackbone(dense_stage=dense_stage)
