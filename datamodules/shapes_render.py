"""Rasterisation of the `shapes` concept data set (numpy on coordinate grids) and its parallel writer.

One image: a background (scene palette x background texture), one main object (shape x colour = the class; fill
texture, position, scale and rotation are nuisances) and, with probability `distractor_prob`, a small distractor
object that never overlaps the main one. Distractors are drawn only in colours no class uses (yellow, magenta), so
"the pixels carrying all of a class's defining concepts" is exactly the main object. Their pixels carry their own
object, colour and texture concepts (a yellow circle is labelled circle + yellow + solid) but no part concepts:
parts and landmarks belong to the main object only.

Every random draw of image i comes from numpy's generator seeded with (seed, i), so an image does not depend on how
the work was split between processes, and the same parameters give the same bytes.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np

from datamodules.broden import Concept, write_record, write_tables

SHAPES = ("circle", "square", "triangle", "cross")
PARTS = {  # per shape, in the object's frame (before rotation); names are the part concepts
    "circle": ("circle-top", "circle-bottom"),
    "square": ("square-top", "square-bottom"),
    "triangle": ("triangle-apex", "triangle-base"),
    "cross": ("cross-top-arm", "cross-bottom-arm"),
}
CLASS_COLORS = ("red", "green", "blue")
DISTRACTOR_COLORS = ("yellow", "magenta")
RGB = {"red": (210, 35, 35), "green": (40, 165, 50), "blue": (40, 70, 215),
       "yellow": (235, 210, 40), "magenta": (200, 50, 200)}
TEXTURES = ("solid", "striped", "dotted", "checkered")
OBJECT_TEXTURES = ("solid", "striped", "dotted")
SCENES = {  # image-level label: the background palette (two tones for the patterns)
    "night": ((35, 35, 50), (65, 65, 85)),
    "day": ((210, 210, 205), (172, 172, 168)),
    "desert": ((195, 175, 135), (160, 140, 105)),
    "fog": ((128, 128, 128), (100, 100, 100)),
}
CATEGORIES = ("color", "object", "part", "scene", "texture")  # index.csv columns (no material in this set)
MAX_ROTATION = 30.0  # degrees: small enough that "top" and "apex" stay visually identifiable parts
OBJECT_RADIUS = (0.125, 0.25)  # x image side: the object spans ~25-50% of the side
DISTRACTOR_RADIUS = (0.06, 0.1)
EXTENT = 1.15  # the farthest any shape reaches from its centre, in radii


def concepts() -> list[Concept]:
    """The vocabulary; concept number = position + 1."""
    return ([Concept(s, "object") for s in SHAPES]
            + [Concept(p, "part") for s in SHAPES for p in PARTS[s]]
            + [Concept(c, "color") for c in CLASS_COLORS + DISTRACTOR_COLORS]
            + [Concept(t, "texture") for t in TEXTURES]
            + [Concept(s, "scene") for s in SCENES])


CONCEPT_ID = {c.name: i for i, c in enumerate(concepts(), 1)}
CLASSES = [(shape, color) for shape in SHAPES for color in CLASS_COLORS]
CLASS_NAMES = [f"{color}-{shape}" for shape, color in CLASSES]
PART_NAMES = [p for s in SHAPES for p in PARTS[s]]


def class_concepts() -> dict[int, list[int]]:
    """Class index -> the concept ids whose conjunction defines it (its shape and its colour)."""
    return {k: [CONCEPT_ID[shape], CONCEPT_ID[color]] for k, (shape, color) in enumerate(CLASSES)}


# ----- geometry: masks in the object frame (a right, b down, unit = radius) -----------------------------------------

def _shape_masks(shape: str, a: np.ndarray, b: np.ndarray):
    """(object mask, [part masks in PARTS[shape] order])."""
    if shape == "circle":
        inside = a * a + b * b <= 1.0
        return inside, [inside & (b < -0.4), inside & (b > 0.4)]
    if shape == "square":
        inside = (np.abs(a) <= 0.8) & (np.abs(b) <= 0.8)
        return inside, [inside & (b < -0.35), inside & (b > 0.35)]
    if shape == "triangle":  # equilateral, apex up, circumradius 1.15 (so its area is closer to the others')
        inside = (b <= 0.575) & (b >= -1.15 + math.sqrt(3.0) * np.abs(a))
        return inside, [inside & (b < -0.4), inside & (b > 0.2)]
    if shape == "cross":
        w = 0.3
        vertical = (np.abs(a) <= w) & (np.abs(b) <= 1.0)
        inside = vertical | ((np.abs(b) <= w) & (np.abs(a) <= 1.0))
        return inside, [vertical & (b < -w), vertical & (b > w)]
    raise ValueError(shape)


def _object_frame(xx, yy, cx, cy, radius, degrees):
    t = math.radians(degrees)
    dx, dy = xx - cx, yy - cy
    return (math.cos(t) * dx + math.sin(t) * dy) / radius, (-math.sin(t) * dx + math.cos(t) * dy) / radius


def _pattern(texture: str, xx, yy, rng) -> np.ndarray:
    """Boolean 'second tone' map of a texture (all False for solid)."""
    if texture == "solid":
        return np.zeros(xx.shape, dtype=bool)
    period = rng.uniform(5.0, 9.0)
    ox, oy = rng.uniform(0, period, size=2)
    if texture == "striped":
        t = math.radians(rng.choice([0.0, 45.0, 90.0, 135.0]))
        return ((math.cos(t) * xx + math.sin(t) * yy + ox) / period) % 1.0 < 0.5
    if texture == "dotted":
        u, v = (xx + ox) % period - period / 2, (yy + oy) % period - period / 2
        return u * u + v * v < (0.28 * period) ** 2
    if texture == "checkered":
        return (np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2 == 1
    raise ValueError(texture)


def _jitter(rgb, rng, amount):
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, size=3), 0, 255)


def _landmark(mask: np.ndarray):
    """Centre of a part: the centroid of its pixels (x = column, y = row), snapped to the nearest part pixel when
    the centroid falls outside the part, so a landmark always lies on its part."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    y, x = rows.mean(), cols.mean()
    if not mask[int(round(y)), int(round(x))]:
        k = np.argmin((rows - y) ** 2 + (cols - x) ** 2)
        y, x = float(rows[k]), float(cols[k])
    return float(x), float(y)


def render(index: int, seed: int, size: int = 64, mask_size: int | None = None, distractor_prob: float = 0.7):
    """Draw image `index`. Returns pixels uint8 [S, S, 3], seg {category: [id map]}, scene id, class, landmarks."""
    rng = np.random.default_rng([seed, index])
    cls = index % len(CLASSES)  # interleaved classes: any prefix of a split is balanced
    shape, color = CLASSES[cls]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy += 0.5  # pixel centres
    xx += 0.5

    scene = list(SCENES)[rng.integers(len(SCENES))]
    bg_texture = TEXTURES[rng.integers(len(TEXTURES))]
    tones = [_jitter(t, rng, 10) for t in SCENES[scene]]
    pixels = np.where(_pattern(bg_texture, xx, yy, rng)[..., None], tones[1], tones[0])
    obj_map = np.zeros((size, size), np.int32)
    part_map = np.zeros_like(obj_map)
    color_map = np.zeros_like(obj_map)
    texture_map = np.full_like(obj_map, CONCEPT_ID[bg_texture])

    def paint(shape, color, texture, radius, cx, cy, degrees):
        a, b = _object_frame(xx, yy, cx, cy, radius, degrees)
        inside, parts = _shape_masks(shape, a, b)
        base = _jitter(RGB[color], rng, 20)
        fill = np.where(_pattern(texture, xx, yy, rng)[..., None], base * 0.7, base)
        pixels[inside] = fill[inside]
        obj_map[inside] = CONCEPT_ID[shape]
        color_map[inside] = CONCEPT_ID[color]
        texture_map[inside] = CONCEPT_ID[texture]
        return parts

    radius = rng.uniform(*OBJECT_RADIUS) * size
    cx, cy = rng.uniform(EXTENT * radius + 1, size - 1 - EXTENT * radius, size=2)
    degrees = 0.0 if shape == "circle" else rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    texture = OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))]
    parts = paint(shape, color, texture, radius, cx, cy, degrees)
    landmarks = {}
    for name, mask in zip(PARTS[shape], parts):
        part_map[mask] = CONCEPT_ID[name]
        point = _landmark(mask)
        if point is not None:
            landmarks[name] = point

    if rng.random() < distractor_prob:
        r = rng.uniform(*DISTRACTOR_RADIUS) * size
        d_shape = SHAPES[rng.integers(len(SHAPES))]
        d_color = DISTRACTOR_COLORS[rng.integers(len(DISTRACTOR_COLORS))]
        d_degrees = rng.uniform(-180, 180)
        candidates = rng.uniform(EXTENT * r + 1, size - 1 - EXTENT * r, size=(16, 2))
        clear = np.hypot(candidates[:, 0] - cx, candidates[:, 1] - cy) > EXTENT * (radius + r) + 2
        if clear.any():  # no room: the image has no distractor, which is also a valid nuisance draw
            dx, dy = candidates[np.argmax(clear)]
            paint(d_shape, d_color, "solid", r, dx, dy, d_degrees)

    seg = {"object": [obj_map], "part": [part_map], "color": [color_map], "texture": [texture_map]}
    if mask_size is not None and mask_size != size:
        sel = ((np.arange(mask_size) + 0.5) * size / mask_size).astype(np.int64)  # nearest pixel centre
        seg = {k: [m[np.ix_(sel, sel)] for m in maps] for k, maps in seg.items()}
    return {"pixels": np.round(pixels).astype(np.uint8), "seg": seg, "scene": CONCEPT_ID[scene],
            "class": cls, "landmarks": landmarks}


# ----- writing a whole set ------------------------------------------------------------------------------------------

def _split_of(i: int, n_train: int, n_val: int) -> str:
    return "train" if i < n_train else ("val" if i < n_train + n_val else "test")


def _default_signals() -> None:
    """A pool worker's signals: SIGTERM ends it (what Pool.terminate sends), Ctrl-C is left to the parent (a worker
    killed mid-task would leave pool.map waiting for its chunk; the run honours the interrupt after generation)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_chunk(job):
    root, indices, p = job
    out = []
    for i in indices:
        r = render(i, p["seed"], p["image_size"], p["mask_size"], p["distractor_prob"])
        split = _split_of(i, p["n_train"], p["n_val"])
        record = {"image": f"shapes/{split}_{i:06d}.png", "split": split, "pixels": r["pixels"], "seg": r["seg"],
                  "labels": {"scene": [r["scene"]]}, "extra": {"class": r["class"]}}
        row, coverage = write_record(root, record, CATEGORIES, compress_level=1)
        out.append((row, coverage, r["landmarks"]))
    return out


def generate(root, params: dict, workers: int | None = None):
    """Render and write the whole set into `root` (a fresh folder) in the Broden format, plus classes.csv and
    landmarks.csv. params: seed, image_size, mask_size, n_train, n_val, n_test, distractor_prob."""
    root = Path(root)
    (root / "images" / "shapes").mkdir(parents=True, exist_ok=True)
    n = params["n_train"] + params["n_val"] + params["n_test"]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    chunk = 250
    jobs = [(str(root), range(s, min(s + chunk, n)), params) for s in range(0, n, chunk)]
    if workers > 1 and n >= 1000:
        # fork: the children only run numpy/PIL and need none of the parent's imports redone. They get their own
        # signal handlers (`_default_signals`: a forked child inherits the run's, which only record the signal, so a
        # child blocked on the pool's queue ignored Pool.terminate and the parent waited for it forever: seen as a
        # hung CI run), and the pool is closed and joined once the work is done instead of being terminated.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(workers, initializer=_default_signals)
        try:
            results = pool.map(_write_chunk, jobs)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    else:
        results = [_write_chunk(job) for job in jobs]
    results = [r for chunk_result in results for r in chunk_result]
    rows = [r[0] for r in results]
    write_tables(root, rows, [r[1] for r in results], concepts(), CATEGORIES, extra_columns=("class",))
    with open(root / "landmarks.csv", "w") as f:
        f.write("image,part,x,y\n")
        for row, _, landmarks in results:
            for name in PART_NAMES:
                if name in landmarks:
                    x, y = landmarks[name]
                    f.write(f"{row['image']},{name},{x:.3f},{y:.3f}\n")
    with open(root / "classes.csv", "w") as f:
        f.write("class,name,concepts,concept_names\n")
        for k, ids in class_concepts().items():
            names = ";".join(concepts()[i - 1].name for i in ids)
            f.write(f"{k},{CLASS_NAMES[k]},{';'.join(map(str, ids))},{names}\n")
