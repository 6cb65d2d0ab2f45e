"""What every method's output is turned into before it is compared or drawn."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of [B, C, h, w] maps to `size` (antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrink = maps.shape[-1] > size[-1] or maps.shape[-2] > size[-2]
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def heatmap(maps: Tensor) -> Tensor:
    """[B, H, W] importance from a method's output: single-channel maps as they are, gradient images (guided
    backprop, guided Grad-CAM) as |.| max over channels."""
    return maps[:, 0] if maps.shape[1] == 1 else maps.abs().amax(1)
