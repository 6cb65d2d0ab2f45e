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
CELLS = 3  # per gallery prototype: source image with box, its overlay, the patch


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


def native_patch(image: np.ndarray, box: Sequence[int], size: int) -> Image.Image:
    """The box's crop at native resolution: enlarged by the largest whole factor that fits `size` (nearest
    neighbour, every image pixel a block of pixels, no interpolation blur), shrunk only when larger than `size`."""
    patch = crop(image, box)
    w, h = patch.size
    factor = max(1, size // max(w, h))
    if max(w, h) > size:
        return patch.resize((max(1, w * size // max(w, h)), max(1, h * size // max(w, h))), Image.NEAREST)
    return patch.resize((w * factor, h * factor), Image.NEAREST)


def centred(canvas: Image.Image, tile: Image.Image, x: int, y: int, size: int) -> None:
    canvas.paste(tile, (x + (size - tile.size[0]) // 2, y + (size - tile.size[1]) // 2))


def render_gallery(result: PushResult, source_images: dict[int, torch.Tensor], out_dir: Path,
                   class_names: Sequence[str] | None = None, thumbnail: int = 64,
                   classes_per_page: int = 20) -> list[Path]:
    """PNG pages, one row per class: for each prototype its source image unobscured with the high-activation box,
    the same with the activation overlay, and the prototype patch (the box's crop at native resolution, as in the
    paper's figures). Unpushed prototypes are left grey."""
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
        cell = Image.new("RGB", (CELLS * thumbnail + 4, thumbnail), (128, 128, 128))
        idx = index[j]
        if pushed[j] and idx in images:
            img = images[idx]
            cell.paste(draw_box(img, boxes[j]).resize((thumbnail, thumbnail)), (0, 0))
            cell.paste(draw_box(overlay(img, ups[j], lut), boxes[j]).resize((thumbnail, thumbnail)), (thumbnail + 2, 0))
            patch_cell = Image.new("RGB", (thumbnail, thumbnail), (255, 255, 255))
            centred(patch_cell, native_patch(img, boxes[j], thumbnail), 0, 0, thumbnail)
            cell.paste(patch_cell, (2 * thumbnail + 4, 0))
        cells[j] = cell
    out_dir.mkdir(parents=True, exist_ok=True)
    label_w, gap = 110, 4
    ordered = sorted(per_class)
    width = label_w + max(len(v) for v in per_class.values()) * (CELLS * thumbnail + 4 + gap)
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
                sheet.paste(cells[j], (label_w + k * (CELLS * thumbnail + 4 + gap), y))
        path = out_dir / f"gallery_p{page:02d}.png"
        sheet.save(path, compress_level=1)  # fast encoding: the gallery is rewritten after every push
        paths.append(path)
    return paths



def _evidence_text(expl: dict[str, torch.Tensor], i: int, prefix: str, name, top: int) -> str:
    """The decision of one class as a sum that adds up to its printed logit."""
    k = int(expl[prefix + "class"][i]) if prefix else int(expl["pred"][i])
    shown = float(expl[prefix + "contribution"][i].sum())
    return (f"{name(k)}: logit {float(expl[prefix + 'logit'][i]):.2f} =\n"
            f"  {shown:+.2f} top {top} prototypes\n"
            f"  {float(expl[prefix + 'own_rest'][i]):+.2f} other own-class prototypes\n"
            f"  {float(expl[prefix + 'off_rest'][i]):+.2f} other classes' prototypes\n"
            f"  {float(expl[prefix + 'bias'][i]):+.2f} bias")


def render_explanation(image01: torch.Tensor, label: int, expl: dict[str, torch.Tensor], i: int,
                       result: PushResult, source_images: dict[int, torch.Tensor], path: Path,
                       class_names: Sequence[str] | None = None, size: int = 96) -> Path:
    """One panel per test image: for each top prototype, the test image with the box where the prototype activates
    (unobscured, then with the activation overlay), the prototype patch at native resolution and its source image
    with the box, and similarity x weight = contribution; below, the whole decision (top prototypes, the rest of the
    own-class evidence, the other classes' evidence and the bias, adding up to the printed logit) for the predicted
    class and the runner-up class (its top prototypes' contributions listed)."""
    lut = _jet()
    name = (lambda c: class_names[c] if class_names and c < len(class_names) else str(c))
    img = to_uint8(image01)
    s = img.shape[0]
    ups = upsample_maps(expl["maps"][i], s)
    boxes = high_activation_boxes(expl["maps"][i], s)
    top = ups.shape[0]
    text_w, footer = 250, 96
    sheet = Image.new("RGB", (size * 4 + text_w + 12, (top + 1) * (size + 4) + 4 + footer), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    sheet.paste(Image.fromarray(img).resize((size, size)), (2, 2))
    pred = int(expl["pred"][i])
    draw.text((size + 8, 8), f"true: {name(label)}\npredicted: {name(pred)}\n"
              f"own-class evidence share {float(expl['own_share'][i]):.2f}", fill=(0, 0, 0))
    draw.text((2 * size + 8, 8), "test image | activation | prototype patch | its source", fill=(90, 90, 90))
    for r in range(top):
        y = (r + 1) * (size + 4) + 2
        j = int(expl["prototypes"][i, r])
        sheet.paste(draw_box(img, boxes[r]).resize((size, size)), (2, y))
        sheet.paste(draw_box(overlay(img, ups[r], lut), boxes[r]).resize((size, size)), (size + 4, y))
        idx = int(result.image_index[j])
        if bool(result.pushed[j]) and idx in source_images:
            src = to_uint8(source_images[idx])
            centred(sheet, native_patch(src, result.high_activation_box[j], size), 2 * size + 6, y, size)
            sheet.paste(draw_box(src, result.high_activation_box[j]).resize((size, size)), (3 * size + 8, y))
        draw.text((4 * size + 12, y + 4),
                  f"this looks like prototype {j}\n(class {name(int(result.classes[j]))})\n"
                  f"similarity {float(expl['similarity'][i, r]):.3f}\nx weight {float(expl['weight'][i, r]):.3f}\n"
                  f"= {float(expl['contribution'][i, r]):+.3f} to the logit", fill=(0, 0, 0))
    y = (top + 1) * (size + 4) + 4
    draw.text((2, y), _evidence_text(expl, i, "", name, top), fill=(0, 0, 0))
    if "runner_up_class" in expl:
        runner = _evidence_text(expl, i, "runner_up_", name, top)
        listed = ", ".join(f"p{int(j)} {float(c):+.2f}" for j, c in
                           zip(expl["runner_up_prototypes"][i], expl["runner_up_contribution"][i]))
        draw.text((2 * size + 8, y), f"runner-up {runner}\n  (top: {listed})", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
