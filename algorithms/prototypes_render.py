"""Figures of ProtoPNet prototypes (plain code, no Lightning): the prototype gallery (each prototype's source image
with its activation overlay and high-activation box, next to the prototype patch) and "this looks like that" panels
(algorithms/prototypes.py `explain`). Images are composed with PIL and numpy; only the jet colour map comes from
matplotlib, imported when a figure is drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.protopnet_push import PushResult, high_activation_boxes, upsample_maps

BOX_COLOUR = (255, 255, 0)


def _jet() -> np.ndarray:
    import matplotlib
    return (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def to_uint8(image01: torch.Tensor) -> np.ndarray:
    """[C, S, S] in [0, 1] -> [S, S, 3] uint8 (grey images repeated over RGB)."""
    # numpy, not torch: tiny torch ops pay the intra-op thread pool's latency, 200x per gallery
    img = np.clip(image01.detach().cpu().float().numpy(), 0, 1)
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    return np.ascontiguousarray((img[:3].transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))


def overlay(image: np.ndarray, activation_up: torch.Tensor, lut: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet heat map of an upsampled activation map [S, S] (rescaled to [0, 1]) over an image."""
    a = np.asarray(activation_up.detach().cpu().numpy() if torch.is_tensor(activation_up) else activation_up,
                   dtype=np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    heat = lut[(a * 255).astype(np.int64)]
    return ((1 - alpha) * image + alpha * heat).round().astype(np.uint8)


def draw_box(image: np.ndarray, box: Sequence[int], colour=BOX_COLOUR, width: int = 1) -> Image.Image:
    pil = Image.fromarray(image)
    y0, y1, x0, x1 = (int(v) for v in box)
    if y1 > y0 and x1 > x0:
        ImageDraw.Draw(pil).rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
    return pil


def crop(image: np.ndarray, box: Sequence[int]) -> Image.Image:
    y0, y1, x0, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        return Image.fromarray(image)
    return Image.fromarray(image[y0:y1, x0:x1])


def render_gallery(result: PushResult, source_images: dict[int, torch.Tensor], out_dir: Path,
                   class_names: Sequence[str] | None = None, thumbnail: int = 64,
                   classes_per_page: int = 20) -> list[Path]:
    """PNG pages, one row per class: for each prototype its source image with the activation overlay and the
    high-activation box, and the prototype patch (the box's crop). Unpushed prototypes are left grey."""
    lut = _jet()
    m = result.prototypes.shape[0]
    classes = result.classes.tolist()
    per_class: dict[int, list[int]] = {}
    for j, c in enumerate(classes):
        per_class.setdefault(c, []).append(j)
    ups = upsample_maps(result.activation, result.image_size).numpy()
    images = {i: to_uint8(im) for i, im in source_images.items()}
    index, pushed, boxes = result.image_index.tolist(), result.pushed.tolist(), result.high_activation_box.tolist()
    cells: dict[int, Image.Image] = {}
    for j in range(m):
        cell = Image.new("RGB", (2 * thumbnail + 2, thumbnail), (128, 128, 128))
        idx = index[j]
        if pushed[j] and idx in images:
            img = images[idx]
            src = draw_box(overlay(img, ups[j], lut), boxes[j]).resize((thumbnail, thumbnail))
            patch = crop(img, boxes[j]).resize((thumbnail, thumbnail))
            cell.paste(src, (0, 0))
            cell.paste(patch, (thumbnail + 2, 0))
        cells[j] = cell
    out_dir.mkdir(parents=True, exist_ok=True)
    label_w, gap = 110, 4
    ordered = sorted(per_class)
    width = label_w + max(len(v) for v in per_class.values()) * (2 * thumbnail + 2 + gap)
    paths = []
    for page, start in enumerate(range(0, len(ordered), classes_per_page)):
        rows = ordered[start:start + classes_per_page]
        sheet = Image.new("RGB", (width, len(rows) * (thumbnail + gap)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for r, c in enumerate(rows):
            y = r * (thumbnail + gap)
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            draw.text((2, y + thumbnail // 2 - 6), f"{c}: {name}"[:18], fill=(0, 0, 0))
            for k, j in enumerate(per_class[c]):
                sheet.paste(cells[j], (label_w + k * (2 * thumbnail + 2 + gap), y))
        path = out_dir / f"gallery_p{page:02d}.png"
        sheet.save(path, compress_level=1)  # fast encoding: the gallery is rewritten after every push
        paths.append(path)
    return paths



def render_explanation(image01: torch.Tensor, label: int, expl: dict[str, torch.Tensor], i: int,
                       result: PushResult, source_images: dict[int, torch.Tensor], path: Path,
                       class_names: Sequence[str] | None = None, size: int = 96) -> Path:
    """One panel per test image: for each top prototype, where it activates on the test image (overlay + box),
    the prototype patch, and similarity x weight = contribution to the predicted logit."""
    lut = _jet()
    name = (lambda c: class_names[c] if class_names and c < len(class_names) else str(c))
    img = to_uint8(image01)
    s = img.shape[0]
    ups = upsample_maps(expl["maps"][i], s)
    boxes = high_activation_boxes(expl["maps"][i], s)
    top = ups.shape[0]
    text_w = 230
    sheet = Image.new("RGB", (size * 3 + text_w + 8, (top + 1) * (size + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    sheet.paste(Image.fromarray(img).resize((size, size)), (2, 2))
    pred = int(expl["pred"][i])
    draw.text((size + 8, 8), f"true: {name(label)}\npredicted: {name(pred)}\nlogit: "
              f"{float(expl['logits'][i, pred]):.2f}", fill=(0, 0, 0))
    for r in range(top):
        y = (r + 1) * (size + 4) + 2
        j = int(expl["prototypes"][i, r])
        sheet.paste(draw_box(overlay(img, ups[r], lut), boxes[r]).resize((size, size)), (2, y))
        idx = int(result.image_index[j])
        if bool(result.pushed[j]) and idx in source_images:
            src = to_uint8(source_images[idx])
            sheet.paste(crop(src, result.high_activation_box[j]).resize((size, size)), (size + 4, y))
            sheet.paste(draw_box(src, result.high_activation_box[j]).resize((size, size)), (2 * size + 6, y))
        draw.text((3 * size + 10, y + 4),
                  f"this looks like prototype {j}\n(class {name(int(result.classes[j]))})\n"
                  f"similarity {float(expl['similarity'][i, r]):.3f}\nx weight {float(expl['weight'][i, r]):.3f}\n"
                  f"= {float(expl['contribution'][i, r]):.3f} to the logit", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
