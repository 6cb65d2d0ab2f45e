"""Image grids of feature visualization (rank 0 draws them; torchvision's writer is imported only when drawing)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from algorithms.featviz.dataset_examples import crop_patches
from core.image_sheet import grid_sheet


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
    patches = patch_crops(raws, positions, map_size, patch)
    save_grid(patches, path, nrow=per_unit, upscale=max(1, 48 // patches.shape[-1]))


def patch_crops(raws: Tensor, positions: Tensor, map_size: Sequence[int], patch: int | None = None) -> Tensor:
    """The patches [N, C, p, p] of `raws` [N, C, H, W] around their map positions [N, 2]; side `patch` or half the
    image side (>= 8 px), at most the image."""
    H = raws.shape[-1]
    return crop_patches(raws.float().cpu(), positions.cpu(), map_size, min(patch or max(8, H // 2), H))


def save_unit_sheet(vis01: Tensor, patches01: Tensor | None, path, row_labels: Sequence[str],
                    patch_labels: Sequence[Sequence[str]] | None = None, title: str = "", cell: int = 96,
                    headers: Sequence[str] = ("optimised image", "top probe patches"), columns: int = 1):
    """A labelled sheet, one row per unit: its label (`row_labels`, may hold several lines), its visualisation
    `vis01` [U, C, H, W] and, when given, its top patches `patches01` [U, k, C, p, p] each captioned with
    `patch_labels[u][j]`; `title` on top; the rows in `columns` columns (core.image_sheet.grid_sheet). Returns where
    the images went: {"cell": side, "vis": [(x, y)] per unit, "patches": [[(x, y)] * k] per unit} (top-left
    corners in the sheet)."""
    k = 0 if patches01 is None else patches01.shape[1]
    cells = [[vis01[u], *(patches01[u] if k else [])] for u in range(vis01.shape[0])]
    captions = None if patch_labels is None else [[None, *row] for row in patch_labels]
    layout = grid_sheet(cells, path, row_labels=row_labels, col_headers=list(headers[:1 + bool(k)]), title=title,
                        cell=cell, captions=captions, columns=columns)
    return {"cell": layout["cell"], "vis": [row[0] for row in layout["boxes"]],
            "patches": [row[1:] for row in layout["boxes"]]}


def unit_label(unit, pooling: str, concept: str | None = None, owner: str | None = None) -> str:
    """The label of one unit's row in a unit sheet: "unit j" (or "prototype j" and "class <owner>" for a prototype),
    its dissection concept when known, its final activation on the optimised image with the start, and the final
    activation against the unit's mean over the probe images. `unit`: a FeatvizUnit."""
    lines = [f"unit {unit.index}"] if owner is None else [f"prototype {unit.index}", f"class {owner}"]
    if concept:
        lines.append(concept)
    lines.append(f"{pooling} {unit.final:.2f} (start {unit.initial:.2f})")
    if unit.data_mean:
        lines.append(f"{unit.final / unit.data_mean:.1f}x its data mean")
    return "\n".join(lines)
