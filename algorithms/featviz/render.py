"""Image grids of feature visualization (rank 0 draws them; torchvision's writer is imported only when drawing)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from algorithms.featviz.dataset_examples import crop_patches


def save_grid(images01: Tensor, path, nrow: int, upscale: int = 1) -> None:
    from torchvision.utils import save_image
    img = images01.detach().float().cpu().clamp(0, 1)
    if upscale > 1:
        img = img.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    save_image(img, str(path), nrow=nrow, padding=2, pad_value=1.0)


def save_patch_grid(raws: Tensor, positions: Tensor, map_size: Sequence[int], path, per_unit: int,
                    patch: int | None = None) -> None:
    """One row of `per_unit` patches per unit: `raws` [U * per_unit, C, H, W] (unit-major) images in [0, 1], each
    cropped around its map position [U * per_unit, 2]; patch side: `patch` or half the image side (>= 8 px)."""
    H = raws.shape[-1]
    patch = patch or max(8, H // 2)
    patches = crop_patches(raws.float().cpu(), positions.cpu(), map_size, min(patch, H))
    save_grid(patches, path, nrow=per_unit, upscale=max(1, 48 // patch))
