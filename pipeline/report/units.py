"""Unit cards: one per unit of a dissected layer, and one per prototype of a ProtoPNet.

A unit card puts together what the callbacks wrote about one unit in different files: its best concept and IoU
(dissection.json), its feature visualization and top activating patches (featviz.json + units.png/patches.png,
only for the first few units featviz visualises), its maximally activating probe images otherwise (dissection's
top_images, read from the run's probe set when the data is on this machine), and its share of each class's positive
evidence (composability.json, where the model's decision is a sum over this layer's units). The same records feed
the page and the W&B table.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.report.folder import RunFolder
from pipeline.report.images import grid_cells, grid_rows, open_rgb, strip

log = logging.getLogger(__name__)

THUMB = 40          # px of one top image on a card
TOP_IMAGES = 4      # top images per card


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "layer"


def unit_anchor(layer: str, unit: int) -> str:
    """Anchor id of a unit card; `unit` is 1-based as in dissection's tables and composability's files."""
    return f"unit-{slug(layer)}-{unit}"


def prototype_anchor(j: int) -> str:
    return f"prototype-{j}"


@dataclass
class UnitCard:
    layer: str
    unit: int                               # 1-based (channel = unit - 1)
    best_concept: str                       # the best concept even when below the IoU threshold ("-" for none)
    category: str
    iou: float
    interpretable: bool
    featviz: Image.Image | None = None
    patches: Image.Image | None = None
    top: Image.Image | None = None          # strip of the top activating probe images
    weights: list[tuple[str, float]] = field(default_factory=list)   # (class, share of its positive evidence)

    @property
    def anchor(self) -> str:
        return unit_anchor(self.layer, self.unit)

    @property
    def concept(self) -> str:
        return self.best_concept if self.interpretable else "-"

    @property
    def max_weight(self) -> float:
        return max((w for _, w in self.weights), default=0.0)


def composition_weights(composition, layer: str) -> dict[int, list[tuple[str, float]]]:
    """unit (0-based) -> [(class, share)] from the top units of every class, when the composition is over `layer`."""
    out: dict[int, list[tuple[str, float]]] = {}
    if composition is None or composition.layer != layer:
        return out
    for cls in composition.classes:
        for unit, _, share in cls.top_units:
            out.setdefault(unit, []).append((cls.name, share))
    return out


def probe_dataset(run: RunFolder):
    """The probe set the dissection callback used (its `probe` folder, else the datamodule's probe split), without
    generating or downloading anything; None when the data is not on this machine."""
    import hydra
    split = run.select("callbacks.dissection.probe_split", "val")
    probe_path = run.select("callbacks.dissection.probe")
    dm_cfg = run.select("datamodule")
    if dm_cfg is None:
        return None
    dm = hydra.utils.instantiate(dm_cfg)
    if probe_path:
        from algorithms.probe_sets import open_broden
        return open_broden(probe_path, split=split, image_size=getattr(dm, "image_size", None),
                           mean=getattr(dm, "mean", None), std=getattr(dm, "std", None))
    folder = getattr(dm, "folder", None)
    if folder is not None and not Path(folder).exists():   # a generated data set that was deleted: not regenerated
        return None
    getter = getattr(dm, "probe_dataset", None)
    return getter(split) if callable(getter) else None


def _pil(raw) -> Image.Image:
    """A [C, H, W] image in [0, 1] as PIL (in numpy: a few hundred tiny torch ops cost seconds on a busy machine)."""
    import numpy as np
    a = (np.clip(raw.numpy(), 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def unit_cards(run: RunFolder, dissection, composition, featviz_entry, notes: list[str]) -> dict[str, list[UnitCard]]:
    """Cards per layer: the first dissected layer and the composition's layer when that is dissected too."""
    if dissection is None:
        return {}
    _, epoch_result = dissection
    layers = list(epoch_result.layers)
    chosen = layers[:1]
    if composition is not None and composition.layer in epoch_result.layers and composition.layer not in chosen:
        chosen.append(composition.layer)

    images: dict[int, Image.Image] = {}
    tops = {layer: epoch_result.layers[layer].top_images[:, :TOP_IMAGES].tolist() for layer in chosen}
    wanted = sorted({i for rows in tops.values() for row in rows for i in row if i >= 0})
    if wanted:
        try:
            probe = probe_dataset(run)
            if probe is None:
                notes.append("unit cards without top activating images: the probe set is not on this machine")
            else:
                items = {i: probe[i] for i in wanted if i < len(probe)}
                images = {i: _pil(it["raw"] if "raw" in it else it["image"]) for i, it in items.items()}
        except Exception as err:  # noqa: BLE001 - the cards render without their top images
            notes.append(f"unit cards without top activating images: the probe set could not be read "
                         f"({type(err).__name__}: {err})")
            log.warning("report: probe set unreadable (%s: %s)", type(err).__name__, err)

    fv = _featviz_units(run, featviz_entry)
    out: dict[str, list[UnitCard]] = {}
    for layer in chosen:
        res = epoch_result.layers[layer]
        concept, score = res.best
        concept, score = concept.tolist(), score.tolist()
        ok = res.interpretable.tolist()
        weights = composition_weights(composition, layer)
        fv_layer = fv.get(layer, {})
        cards = []
        for u in range(res.num_units):
            c = concept[u]
            top = [images[i] for i in tops[layer][u] if i in images]
            vis, patches = fv_layer.get(u, (None, None))
            cards.append(UnitCard(layer=layer, unit=u + 1, best_concept=res.concept_names[c] if c else "-",
                                  category=res.concept_categories[c] if c else "", iou=float(score[u]),
                                  interpretable=bool(ok[u]), featviz=vis, patches=patches,
                                  top=strip(top, THUMB), weights=weights.get(u, [])))
        out[layer] = cards
    return out


def _featviz_units(run: RunFolder, featviz_entry) -> dict[str, dict[int, tuple]]:
    """layer -> channel -> (visualization, row of top patches), cut out of the latest units.png / patches.png."""
    if featviz_entry is None:
        return {}
    epoch, res = featviz_entry
    folder = run.path / "interp" / "featviz" / f"epoch_{epoch:03d}"
    channels = [u.index for u in res.units if u.kind == "unit"]
    vis: list = [None] * len(channels)
    rows: list = [None] * len(channels)
    try:
        if (folder / "units.png").is_file():
            vis = grid_cells(open_rgb(folder / "units.png"), len(channels), nrow=8)  # callbacks/featviz.py: nrow=8
        if (folder / "patches.png").is_file() and res.top_patches is not None:
            rows = grid_rows(open_rgb(folder / "patches.png"), len(res.top_patches.dataset_index))
    except OSError as err:
        log.warning("report: featviz images unreadable (%s)", err)
    return {res.layer: {ch: (vis[k] if k < len(vis) else None, rows[k] if k < len(rows) else None)
                        for k, ch in enumerate(channels)}}


@dataclass
class PrototypeCard:
    index: int
    class_name: str
    pushed: bool
    distance: float | None
    source_index: int
    image: Image.Image | None                        # source with activation box + the prototype patch
    weights: list[tuple[str, float]] = field(default_factory=list)
    concept: str = ""                                # the concept composability's dissection gave it

    @property
    def anchor(self) -> str:
        return prototype_anchor(self.index)


def prototype_cards(run: RunFolder, records_entry, composition) -> list[PrototypeCard]:
    """One card per prototype of the latest push, its picture cut out of the gallery sheet (one row per class, in
    class order; per prototype a cell of source+box and patch, algorithms/prototypes_render.render_gallery)."""
    if records_entry is None:
        return []
    epoch, records = records_entry
    folder = run.path / "interp" / "prototypes" / f"epoch_{epoch:03d}"
    protos = records.prototypes
    per_class: dict[int, list[int]] = {}
    for p in protos:
        per_class.setdefault(int(p["class"]), []).append(int(p["prototype"]))
    classes = sorted(per_class)
    per_page = int(run.select("callbacks.prototypes.classes_per_page", 20) or 20)
    cells: dict[int, Image.Image] = {}
    for page, start in enumerate(range(0, len(classes), per_page)):
        path = folder / f"gallery_p{page:02d}.png"
        if not path.is_file():
            continue
        sheet = open_rgb(path)
        rows = classes[start:start + per_page]
        gap, label_w = 4, 110                        # render_gallery's layout constants
        thumb = sheet.height // len(rows) - gap
        for r, c in enumerate(rows):
            for k, j in enumerate(per_class[c]):
                x = label_w + k * (2 * thumb + 2 + gap)
                y = r * (thumb + gap)
                cells[j] = sheet.crop((x, y, x + 2 * thumb + 2, y + thumb))
    weights: dict[int, list[tuple[str, float]]] = {}
    concepts: dict[int, str] = {}
    if composition is not None:
        for cls in composition.classes:
            for unit, concept, share in cls.top_units:
                weights.setdefault(unit, []).append((cls.name, share))
                concepts[unit] = concept
    return [PrototypeCard(index=int(p["prototype"]), class_name=str(p.get("class_name", p["class"])),
                          pushed=bool(p.get("pushed")), distance=p.get("distance"),
                          source_index=int(p.get("source_index", -1)), image=cells.get(int(p["prototype"])),
                          weights=weights.get(int(p["prototype"]), []), concept=concepts.get(int(p["prototype"]), ""))
            for p in protos]
