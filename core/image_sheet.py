"""Labelled image sheets drawn with PIL: a grid of image cells with row labels, column headers and a title, for
figures that are mostly images (attribution overlays, feature visualizations). Milliseconds per sheet, where a
matplotlib figure of the same panels takes about a second on the 2-core machine (docs/overhead.md)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def to_pil(image01: Tensor, side: int):
    """A [C, H, W] image in [0, 1] as a PIL RGB image of `side` px, nearest-neighbour, so that the pixels stay
    visible."""
    from PIL import Image
    img = image01.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    arr = (img[:3].permute(1, 2, 0) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.numpy()).resize((side, side), Image.NEAREST)


def text_size(text: str, fnt) -> tuple[int, int]:
    """(width, height) of a possibly multi-line label in `fnt`."""
    from PIL import Image, ImageDraw
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text or " ", font=fnt, spacing=3)
    return box[2], box[3]


def wrap(text: str, width: int, fnt) -> str:
    """`text` broken at spaces and underscores into lines of at most `width` px where possible."""
    import re
    lines: list[str] = []
    for word in re.split(r"(?<=[_ ])", str(text)):   # each piece keeps the underscore or space that ends it
        if lines and text_size((lines[-1] + word).rstrip(), fnt)[0] <= width:
            lines[-1] += word
        else:
            lines.append(word)
    return "\n".join(line.rstrip() for line in lines if line.strip())


def grid_sheet(cells: Sequence[Sequence[Tensor]], path, row_labels: Sequence[str] | None = None,
               col_headers: Sequence[str] | None = None, title: str = "", cell: int = 96, gap: int = 3,
               captions: Sequence[Sequence[str | None]] | None = None, columns: int = 1) -> dict:
    """Save a sheet of `cells` (rows of [C, H, W] images in [0, 1], each shown `cell` px square) with a label left of
    each row, a header over each column, a caption under each cell where `captions[r][c]` is given, and a title; the
    rows in `columns` side-by-side blocks. Returns {"cell": side, "boxes": [[(x, y)] per row]}, the top-left corner
    of every cell in the sheet."""
    from PIL import Image, ImageDraw
    fnt, pad = font(), 6
    rows = len(cells)
    cols = max((len(r) for r in cells), default=0)
    columns = max(1, min(int(columns), rows))
    line_h = text_size("Ag", fnt)[1] + 3
    label_w = max([text_size(lab, fnt)[0] for lab in (row_labels or [])] + [0])
    label_w = label_w + 10 if label_w else 0
    headers = [wrap(h, cell, fnt) for h in (col_headers or [])]
    head_h = max([text_size(h, fnt)[1] + 4 for h in headers] + [0])
    top = pad + (line_h if title else 0) + head_h
    caption_h = max([text_size(c, fnt)[1] + 2 for row in (captions or []) for c in row if c] + [0])
    row_h = max([cell + caption_h] + [text_size(lab, fnt)[1] + 4 for lab in (row_labels or [])])
    block_w = label_w + cols * (cell + gap) + pad
    width = max(pad + columns * block_w, text_size(title, fnt)[0] + 2 * pad if title else 0)
    sheet = Image.new("RGB", (width, top + -(-rows // columns) * (row_h + gap) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=fnt)
    for block in range(columns):
        for c, head in enumerate(headers):
            draw.multiline_text((pad + block * block_w + label_w + c * (cell + gap), top - head_h), head,
                                fill=(60, 60, 60), font=fnt, spacing=3)
    boxes = []
    for r, row in enumerate(cells):
        x0, y = pad + (r % columns) * block_w, top + (r // columns) * (row_h + gap)
        if row_labels:
            draw.multiline_text((x0, y + 2), str(row_labels[r]), fill=(0, 0, 0), font=fnt, spacing=3)
        boxes.append([])
        for c, image in enumerate(row):
            x = x0 + label_w + c * (cell + gap)
            sheet.paste(to_pil(image, cell), (x, y))
            boxes[-1].append((x, y))
            if captions and captions[r][c]:
                draw.multiline_text((x, y + cell + 1), str(captions[r][c]), fill=(60, 60, 60), font=fnt, spacing=3)
    sheet.save(str(path))
    return {"cell": cell, "boxes": boxes}
