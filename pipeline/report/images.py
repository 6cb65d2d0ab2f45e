"""Images embedded into the report as data URIs, at the size the page shows them.

A figure wider than its place on the page is downsampled before encoding (a 1450 px gallery shown 1100 px wide is
stored 1100 px wide); a smaller one is stored as it is and scaled by the browser (pixel art such as featviz grids
stays sharp with `image-rendering: pixelated`). Sheets of photographs are stored as JPEG, plots with thin lines and
text as PNG.
"""
from __future__ import annotations

import base64
import io
import math
from functools import lru_cache
from pathlib import Path

from PIL import Image

from pipeline.report.page import esc


@lru_cache(maxsize=16)
def open_rgb(path: Path) -> Image.Image:
    """A figure decoded once per build (the gallery sheet is both cut into prototype cards and shown whole); the
    callers never modify it in place (crop and resize return new images)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()


def fit(image: Image.Image, width: int | None = None, height: int | None = None) -> Image.Image:
    """Downsampled (never enlarged) to at most `width` x `height`, keeping the aspect ratio."""
    w, h = image.size
    scale = min((width or w) / w, (height or h) / h, 1.0)
    if scale >= 1.0:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)


def data_uri(image: Image.Image, photo: bool = False) -> str:
    buf = io.BytesIO()
    if photo:
        image.convert("RGB").save(buf, "JPEG", quality=85, optimize=False)
        mime = "image/jpeg"
    else:
        image.save(buf, "PNG", compress_level=6)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def img(image: Image.Image | Path, width: int | None = None, alt: str = "", photo: bool = False,
        height: int | None = None, pixelated: bool = False, shown_width: int | None = None) -> str:
    """An <img> with the picture embedded, stored at most `width` x `height` px; `shown_width` displays it larger
    (small pixel images scaled up by the browser, not in the file)."""
    if isinstance(image, (str, Path)):
        image = open_rgb(Path(image))
    image = fit(image, width, height)
    w, h = image.size
    show_w = shown_width or w
    show_h = round(h * show_w / w)
    cls = ' class="px"' if pixelated else ""
    return (f'<img{cls} src="{data_uri(image, photo)}" width="{show_w}" height="{show_h}" alt="{esc(alt)}">')


def grid_cells(image: Image.Image, count: int, nrow: int, padding: int = 2) -> list[Image.Image]:
    """The `count` cells of a torchvision `make_grid` image (`nrow` per row, `padding` px around each cell), in
    order. Sizes follow from the grid's own dimensions: cell = (width - padding) / columns - padding."""
    if count <= 0:
        return []
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    cw = (image.width - padding) // cols - padding
    ch = (image.height - padding) // rows - padding
    cells = []
    for k in range(count):
        r, c = divmod(k, cols)
        x, y = padding + c * (cw + padding), padding + r * (ch + padding)
        cells.append(image.crop((x, y, x + cw, y + ch)))
    return cells


def grid_rows(image: Image.Image, rows: int, padding: int = 2) -> list[Image.Image]:
    """The `rows` horizontal strips of a make_grid image with one row per item (e.g. k patches of one unit)."""
    if rows <= 0:
        return []
    ch = (image.height - padding) // rows - padding
    return [image.crop((0, padding + r * (ch + padding), image.width, padding + r * (ch + padding) + ch))
            for r in range(rows)]


def strip(images: list[Image.Image], size: int, gap: int = 2) -> Image.Image | None:
    """Thumbnails of `size` px side by side (the top activating images of a unit)."""
    if not images:
        return None
    out = Image.new("RGB", (len(images) * size + (len(images) - 1) * gap, size), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB").resize((size, size), Image.BILINEAR), (i * (size + gap), 0))
    return out
