"""The Broden format (Bau et al., "Network Dissection", CVPR 2017): a writer and a reader.

Layout of a Broden folder (the reader accepts the real Broden, e.g. broden1_224, as well as the generated shapes set):

- ``index.csv``: image, split, ih, iw, sh, sw, then one column per category (color, object, material, part, scene,
  texture). A category cell is empty, or ';'-separated items: an integer is an image-level label, anything else a
  PNG path of a pixel label map. Paths are relative to ``images/``. Extra columns are allowed; this project's
  generated sets add ``class`` (the image's class index).
- pixel label = R + 256 * G of the label PNG, 0 = unlabelled. Masks may be smaller than images (real Broden: half
  size), hence ``sh, sw``.
- ``label.csv``: number, name, category, frequency, coverage, syns. The category cell may list several categories
  with counts, e.g. ``color(123);object(4)``; the concept belongs to the one with the largest count.
- ``category.csv``: name, first, last, count, frequency. ``c_<category>.csv``: code, number, name, frequency, coverage.

Written statistics: ``frequency`` = number of images carrying the concept; ``coverage`` = sum over those images of the
fraction of mask pixels it covers (an image-level label covers 1.0).
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import IMAGENET_MEAN, IMAGENET_STD, read_image
from datamodules.errors import DataError

INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")
BRODEN_CATEGORIES = ("color", "object", "material", "part", "scene", "texture")
BRODEN_HINT = ("get a complete copy of the Broden data set (NetDissect's script/dlbroden.sh downloads broden1_224) "
               "or regenerate the folder")


@dataclass(frozen=True)
class Concept:
    """One row of label.csv; its number is its position in the writer's list + 1 (0 is unlabelled)."""
    name: str
    category: str


# ----- label maps ---------------------------------------------------------------------------------------------------

def encode_label_map(ids: np.ndarray) -> np.ndarray:
    """int [H, W] concept ids -> uint8 RGB [H, W, 3] with id = R + 256 * G."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 65536):
        raise ValueError("Broden label maps hold ids in [0, 65535]")
    out = np.zeros(ids.shape + (3,), dtype=np.uint8)
    out[..., 0] = ids % 256
    out[..., 1] = ids // 256
    return out


def decode_label_map(im: Image.Image) -> np.ndarray:
    """PIL image -> int32 [H, W] concept ids. RGB: R + 256 * G; single-channel images hold the id directly."""
    if im.mode in ("RGB", "RGBA", "P"):
        a = np.asarray(im.convert("RGB"))
        return a[..., 0].astype(np.int32) + 256 * a[..., 1].astype(np.int32)
    return np.asarray(im).astype(np.int32)


def save_label_png(path, ids: np.ndarray, compress_level: int = 1):
    Image.fromarray(encode_label_map(ids)).save(path, compress_level=compress_level)


def read_label_png(path, hint: str = BRODEN_HINT) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return decode_label_map(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read label map {path}: {e}. To fix: {hint}") from e


def parse_category_cell(cell: str) -> str:
    """'color(123);object(4)' -> 'color' (largest count; ties: first listed); 'object' -> 'object'."""
    best, best_n = "", -1
    for item in cell.split(";"):
        m = re.fullmatch(r"\s*([^()]*?)\s*(?:\((\d+)\))?\s*", item)
        if not m or not m.group(1):
            continue
        n = int(m.group(2)) if m.group(2) else 0
        if n > best_n:
            best, best_n = m.group(1), n
    return best


# ----- writer -------------------------------------------------------------------------------------------------------

def write_record(root, record: dict, categories, compress_level: int = 1):
    """Write one image and its label maps under root/images/; return (index.csv row, {concept: coverage}).

    record: ``image`` (path relative to images/, e.g. "shapes/train_000001.png"), ``split``, ``pixels`` (uint8
    [H, W, 3] or [H, W]), optional ``seg`` ({category: [int [sh, sw] map, ...]}), ``labels`` ({category: [ids]}),
    ``extra`` ({column: value}). Maps are saved as "<image stem>_<category>[_<k>].png" next to the image.
    """
    images = Path(root) / "images"
    rel = Path(record["image"])
    (images / rel).parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(record["pixels"], dtype=np.uint8)
    Image.fromarray(pixels).save(images / rel, compress_level=compress_level)
    ih, iw = pixels.shape[:2]
    seg, labels = record.get("seg", {}), record.get("labels", {})
    sh, sw = next((m.shape for maps in seg.values() for m in maps), (ih, iw))
    row = {"image": rel.as_posix(), "split": record["split"], "ih": ih, "iw": iw, "sh": sh, "sw": sw}
    coverage: dict[int, float] = {}
    for cat in categories:
        items = []
        for k, ids in enumerate(seg.get(cat, [])):
            ids = np.asarray(ids)
            if ids.shape != (sh, sw):
                raise ValueError(f"{rel}: all label maps of an image must be {sh}x{sw}, got {ids.shape}")
            name = rel.with_name(f"{rel.stem}_{cat}{'' if k == 0 else f'_{k}'}.png")
            save_label_png(images / name, ids, compress_level)
            items.append(name.as_posix())
            counts = np.bincount(ids.ravel())
            for c in np.flatnonzero(counts[1:]) + 1:
                coverage[int(c)] = coverage.get(int(c), 0.0) + counts[c] / ids.size
        for c in labels.get(cat, []):
            items.append(str(int(c)))
            coverage[int(c)] = coverage.get(int(c), 0.0) + 1.0
        row[cat] = ";".join(items)
    row.update(record.get("extra", {}))
    return row, coverage


def write_tables(root, rows, coverages, concepts, categories, extra_columns=()):
    """Write index.csv, label.csv, category.csv and c_<category>.csv from written rows and their coverages."""
    root = Path(root)
    concepts = list(concepts)
    n = len(concepts) + 1
    freq, cover = np.zeros(n, np.int64), np.zeros(n)
    cat_freq = Counter()
    for row, cov in zip(rows, coverages):
        seen = set()
        for c, v in cov.items():
            if not 1 <= c < n:
                raise ValueError(f"{row['image']}: concept id {c} is not in the {len(concepts)} concepts")
            freq[c] += 1
            cover[c] += v
            seen.add(concepts[c - 1].category)
        cat_freq.update(seen)
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(INDEX_FIXED) + list(categories) + list(extra_columns))
        w.writeheader()
        w.writerows(rows)
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for i, c in enumerate(concepts, 1):
            w.writerow([i, c.name, f"{c.category}({freq[i]})", freq[i], f"{cover[i]:.4f}", c.name])
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for cat in categories:
            ids = [i for i, c in enumerate(concepts, 1) if c.category == cat]
            w.writerow([cat, min(ids, default=0), max(ids, default=0), len(ids), cat_freq[cat]])
            with open(root / f"c_{cat}.csv", "w", newline="") as g:
                wc = csv.writer(g)
                wc.writerow(["code", "number", "name", "frequency", "coverage"])
                for code, i in enumerate(ids, 1):
                    wc.writerow([code, i, concepts[i - 1].name, freq[i], f"{cover[i]:.4f}"])


def write_broden(root, records, labels, categories=BRODEN_CATEGORIES, compress_level: int = 1):
    """Write a whole Broden folder: records as in write_record, labels = the concepts (list of Concept)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, coverages, extra = [], [], []
    for record in records:
        row, cov = write_record(root, record, categories, compress_level)
        rows.append(row)
        coverages.append(cov)
        extra += [k for k in record.get("extra", {}) if k not in extra]
    write_tables(root, rows, coverages, labels, categories, extra)


# ----- reader -------------------------------------------------------------------------------------------------------

def _read_csv(path: Path, required, hint) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} lacks the column(s) {missing}; a Broden {path.name} has the columns "
                                f"{list(required)}. To fix: {hint}")
            return list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}. To fix: {hint}") from e


class BrodenDataset(Dataset):
    """Concept probe items from any Broden folder; see the module docstring for the format.

    Item (a dict, default-collatable, fixed shapes):
      image float [C, H, W] normalised, raw float [C, H, W] in [0, 1], label long (the ``class`` column, -1 if none),
      seg long [L, sh, sw] (global concept ids, 0 unlabelled; L = the most label maps any image of the folder has,
      padded with zero maps), image_labels bool [num_concepts + 1] (image-level labels; index 0 unused), index long.

    split: a value of index.csv's split column, or None for all rows. image_size: resize images (int or (h, w));
    None keeps the first row's ih x iw. Masks keep sh x sw of the first row (others are resized, nearest).
    limit: keep the first `limit` rows of the split. cache: keep decoded items in memory after the first read.
    hint: how to fix a missing/corrupt file, appended to error messages.
    """

    def __init__(self, root, split: str | None = None, image_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 limit: int | None = None, cache: bool = False, hint: str = BRODEN_HINT):
        self.root = Path(root)
        self.hint = hint
        self._check_layout()
        self._read_labels()
        rows = _read_csv(self.root / "index.csv", INDEX_FIXED, hint)
        columns = set(rows[0]) if rows else set()
        self.category_names = [c for c in self._category_file_names if c in columns]
        # L is taken over the whole folder, so every split of it collates to the same shape.
        self.max_maps = max((len(self._cell_items(r)[1]) for r in rows), default=0)
        if split is not None:
            available = sorted({r["split"] for r in rows})
            rows = [r for r in rows if r["split"] == split]
            if not rows:
                raise DataError(f"{self.root / 'index.csv'} has no rows with split={split!r} "
                                f"(splits found: {available})")
        elif not rows:
            raise DataError(f"{self.root / 'index.csv'} has no rows. To fix: {hint}")
        if limit is not None:
            rows = rows[:int(limit)]
        self.rows = rows
        self.split = split
        self.seg_size = (int(rows[0]["sh"]), int(rows[0]["sw"]))
        ih, iw = int(rows[0]["ih"]), int(rows[0]["iw"])
        self.image_hw = (ih, iw) if image_size is None else (
            (image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._cache = {} if cache else None

    # --- parsing ---
    def _check_layout(self):
        if not self.root.is_dir():
            raise DataError(f"Broden folder {self.root} not found. To fix: {self.hint}")
        need = ["index.csv", "label.csv", "category.csv", "images/"]
        missing = [n for n in need if not (self.root / n.rstrip("/")).exists()]
        if missing:
            raise DataError(f"{', '.join(missing)} not found in {self.root}; a Broden folder needs index.csv, "
                            f"label.csv, category.csv and images/ (see datamodules/broden.py). To fix: {self.hint}")

    def _read_labels(self):
        cats = _read_csv(self.root / "category.csv", ("name",), self.hint)
        self._category_file_names = [r["name"] for r in cats]
        labels = _read_csv(self.root / "label.csv", ("number", "name", "category"), self.hint)
        try:
            numbered = {int(r["number"]): r for r in labels}
        except ValueError as e:
            raise DataError(f"{self.root / 'label.csv'}: non-integer concept number ({e}). To fix: {self.hint}")
        n = max(numbered, default=0) + 1
        self.concept_names = ["-"] + [""] * (n - 1)
        self.concept_categories = [""] * n
        for i, r in numbered.items():
            if i > 0:
                self.concept_names[i] = r["name"]
                self.concept_categories[i] = parse_category_cell(r["category"])

    def _cell_items(self, row) -> tuple[list[int], list[str]]:
        """(image-level label ids, label-map paths) of an index row, in category order."""
        ids, paths = [], []
        for cat in self._category_file_names:
            for item in (row.get(cat) or "").split(";"):
                item = item.strip()
                if item.isdigit():
                    ids.append(int(item))
                elif item:
                    paths.append(item)
        return ids, paths

    # --- public description ---
    @property
    def num_concepts(self) -> int:
        return len(self.concept_names) - 1

    def category_of(self, concept_id: int) -> str:
        return self.concept_categories[concept_id]

    def concepts_in(self, category: str) -> list[int]:
        return [i for i, c in enumerate(self.concept_categories) if c == category]

    @property
    def labels(self) -> list[int]:
        """Class index of every item (the optional ``class`` column of index.csv), -1 where there is none."""
        return [self.labels_at(i) for i in range(len(self))]

    def __len__(self):
        return len(self.rows)

    # --- items ---
    def _decode(self, i):
        row = self.rows[i]
        image = read_image(self.root / "images" / row["image"], 3, size=self.image_hw,
                           hint=f"it is listed in {self.root / 'index.csv'}. To fix: {self.hint}")
        sh, sw = self.seg_size
        seg = np.zeros((self.max_maps, sh, sw), dtype=np.int32)
        image_labels, paths = self._cell_items(row)
        for k, item in enumerate(paths):
            m = read_label_png(self.root / "images" / item, self.hint)
            if m.shape != (sh, sw):
                m = np.asarray(Image.fromarray(m.astype(np.int32)).resize((sw, sh), Image.NEAREST))
            seg[k] = m
        bad = [c for c in image_labels if not 0 < c <= self.num_concepts]
        if bad or (seg.size and seg.max() > self.num_concepts):
            raise DataError(f"{row['image']} in {self.root / 'index.csv'} uses concept ids "
                            f"{bad or int(seg.max())} beyond the {self.num_concepts} concepts of label.csv. "
                            f"To fix: {self.hint}")
        # int16 halves the memory of a cached probe set; Broden ids stay far below 32768.
        seg = seg.astype(np.int16) if self.num_concepts < 32768 else seg
        return image, seg, image_labels

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += len(self)
        if self._cache is not None and i in self._cache:
            image, seg, image_labels = self._cache[i]
        else:
            image, seg, image_labels = self._decode(i)
            if self._cache is not None:
                self._cache[i] = (image, seg, image_labels)
        raw = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        multi_hot = torch.zeros(self.num_concepts + 1, dtype=torch.bool)
        multi_hot[image_labels] = True
        return {"image": (raw - self.mean) / self.std, "raw": raw, "label": torch.tensor(self.labels_at(i)),
                "seg": torch.from_numpy(seg.astype(np.int64)), "image_labels": multi_hot,
                "index": torch.tensor(i)}

    def labels_at(self, i: int) -> int:
        c = self.rows[i].get("class")
        return int(c) if c not in (None, "") else -1
