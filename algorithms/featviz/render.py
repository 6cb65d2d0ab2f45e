"""Image grids of feature visualization (rank 0 draws them; torchvision's writer is imported only when drawing)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from algorithms.featviz.dataset_examples import crop_patches
from core.image_sheet import font as sheet_font, text_size, to_pil


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
    `patch_labels[u][j]`; `title` on top; the rows in `columns` columns. Drawn with PIL (milliseconds, no matplotlib
    figure). Returns where the images went: {"cell": side, "vis": [(x, y)] per unit, "patches": [[(x, y)] * k] per
    unit} (top-left corners in the sheet)."""
    from PIL import Image, ImageDraw
    U = vis01.shape[0]
    k = 0 if patches01 is None else patches01.shape[1]
    font = sheet_font()
    text_w = lambda s: text_size(s, font)[0]  # noqa: E731
    line_h = text_size("Ag", font)[1] + 3
    label_w = max([text_w(line) for lab in row_labels for line in str(lab).split("\n")] + [40]) + 12
    gap, pad = 4, 6
    row_h = cell + (line_h if k else 0) + gap
    top = pad + (line_h if title else 0) + line_h
    block_w = label_w + cell + (gap * 3 + k * (cell + gap) if k else 0) + pad
    columns = max(1, min(int(columns), U))
    rows = -(-U // columns)
    width = max(block_w * columns + pad, text_w(title) + 2 * pad if title else 0)
    sheet = Image.new("RGB", (width, top + rows * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    y_head = pad + (line_h if title else 0)
    for col in range(columns):
        draw.text((col * block_w + label_w, y_head), headers[0], fill=(80, 80, 80), font=font)
        if k:
            draw.text((col * block_w + label_w + cell + gap * 3, y_head), headers[1], fill=(80, 80, 80), font=font)
    boxes = {"cell": cell, "vis": [], "patches": []}
    for u in range(U):
        x0, y = (u % columns) * block_w, top + (u // columns) * row_h
        draw.multiline_text((x0 + pad, y + 2), str(row_labels[u]), fill=(0, 0, 0), font=font, spacing=3)
        sheet.paste(to_pil(vis01[u], cell), (x0 + label_w, y))
        boxes["vis"].append((x0 + label_w, y))
        boxes["patches"].append([])
        for j in range(k):
            x = x0 + label_w + cell + gap * 3 + j * (cell + gap)
            sheet.paste(to_pil(patches01[u, j], cell), (x, y))
            boxes["patches"][-1].append((x, y))
            if patch_labels is not None:
                draw.text((x, y + cell + 1), str(patch_labels[u][j]), fill=(60, 60, 60), font=font)
    sheet.save(str(path))
    return boxes


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
