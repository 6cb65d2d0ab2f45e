"""The attribution overlay figure (rank 0 draws it)."""
from __future__ import annotations

import torch
from torch import Tensor

from core.image_sheet import grid_sheet


def heat_overlay(image01: Tensor, heat: Tensor, alpha: float = 0.5) -> Tensor:
    """[3, H, W]: the map `heat` [H, W], min-max scaled, in the jet colour map, blended over the image [C, H, W] with
    weight `alpha` (the image stays visible under it)."""
    from matplotlib import colormaps
    h = heat.detach().float().cpu()
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)
    colour = torch.from_numpy(colormaps["jet"](h.numpy())[..., :3]).permute(2, 0, 1).float()
    image = image01.detach().float().cpu().clamp(0, 1)
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    return (1 - alpha) * image + alpha * colour


def gradient_image(grad: Tensor) -> Tensor:
    """[C, H, W] signed gradients centred on grey and scaled by their largest magnitude into [0, 1]."""
    g = grad.detach().float().cpu()
    return (g / (2 * g.abs().max().clamp_min(1e-12)) + 0.5).clamp(0, 1)


def render_overlays(images01: Tensor, maps: dict[str, Tensor], path, titles: list[str] | None = None,
                    title: str = "") -> dict:
    """One row per image, labelled with `titles[r]` (the class explained): the image, then each method's map over
    it (heat maps, [B, 1, H, W]) or alone (gradient images, [B, C, H, W]); the method names head the columns."""
    cells = []
    for r in range(images01.shape[0]):
        row = [images01[r]]
        for m in maps.values():
            row.append(gradient_image(m[r]) if m.shape[1] > 1 else heat_overlay(images01[r], m[r, 0]))
        cells.append(row)
    return grid_sheet(cells, path, row_labels=titles, col_headers=["image", *maps], title=title, cell=96)
