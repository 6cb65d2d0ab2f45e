"""ProtoPNet prototypes after every push: a gallery (each prototype's source image with its activation overlay and
high-activation box, next to the prototype patch), "this looks like that" panels for test images (top prototypes,
similarity, contribution to the logit), and prototype quality measured exactly on ground-truth concept masks.

Plain functions first (usable from a notebook with a model, a PushResult and images); `PrototypeCallback` below
only schedules (end of every epoch that began with a push), shards, reduces, renders on rank 0 and logs.

Quality metrics (computed on the probe set's segmentation maps, at the centre pixel of each feature cell):
- purity: for each prototype, the largest share of its k nearest probe patches lying on one same pixel concept
  (PIP-Net's purity with exact masks instead of part annotations); also per concept category;
- class_object_hit_rate: share of pushed prototypes whose source patch (high-activation box) lies on the object of
  the prototype's class (half the box on the object, or half the object in the box);
- unique_sources: distinct source images after push (collapsed prototypes share one);
- last_layer_sparsity: share of last-layer weights with |w| <= 1e-3 max|w|.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from core import distributed as D
from callbacks.base import InterpretationCallback, write_json
from models.protopnet_push import (NearestPatches, PushResult, high_activation_boxes, k_nearest_patches,
                                   upsample_maps)

log = logging.getLogger(__name__)

BOX_COLOUR = (255, 255, 0)
SPARSITY_TOLERANCE = 1e-3


# ----- rendering -----------------------------------------------------------------------------------------------------
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


# ----- "this looks like that" ----------------------------------------------------------------------------------------
@torch.no_grad()
def explain(model, x: torch.Tensor, top: int = 3) -> dict[str, torch.Tensor]:
    """For images x (normalised): predicted class, and the `top` prototypes with the largest contribution
    sim_j * w[pred, j] to the predicted logit (Fig. 2 of the paper), with their similarity maps [n, top, H, W]."""
    maps = model.similarity_maps(x) * model.prototype_active[None, :, None, None]  # [n, m, H, W]
    sim = maps.flatten(2).max(dim=2).values          # = similarity of the min distance (monotone decreasing)
    logits = model.last_layer(sim)
    pred = logits.argmax(dim=1)
    weight = model.last_layer.weight[pred]              # [n, m]
    contrib, order = (sim * weight).topk(min(top, sim.shape[1]), dim=1)
    return {"pred": pred, "logits": logits, "prototypes": order, "contribution": contrib,
            "similarity": sim.gather(1, order), "weight": weight.gather(1, order),
            "maps": maps[torch.arange(len(x))[:, None], order]}


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


# ----- quality on ground-truth masks ---------------------------------------------------------------------------------
def cell_centres(seg_size: tuple[int, int], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seg-map pixel (row, col) at the centre of each feature cell."""
    sh, sw = seg_size
    rows = ((torch.arange(h) + 0.5) * sh / h).long().clamp(max=sh - 1)
    cols = ((torch.arange(w) + 0.5) * sw / w).long().clamp(max=sw - 1)
    return rows, cols


def concepts_at_patches(centre_labels: torch.Tensor, index: torch.Tensor, position: torch.Tensor,
                        num_concepts: int) -> torch.Tensor:
    """Multi-hot [..., num_concepts + 1] of the pixel concepts at the centres of patches (image index, (h, w)).
    centre_labels: [N, L, H, W] concept ids at every cell centre of every probe image."""
    lab = centre_labels[index, :, position[..., 0], position[..., 1]]  # [..., L]
    hot = torch.zeros(*lab.shape[:-1], num_concepts + 1, dtype=torch.bool)
    hot.scatter_(-1, lab.long(), True)
    hot[..., 0] = False  # 0 = no concept
    return hot


def purity(nearest: NearestPatches, centre_labels: torch.Tensor, num_concepts: int,
           concept_subset: Sequence[int] | None = None) -> torch.Tensor:
    """Per prototype: the largest share of its k nearest patches lying on one same concept, [m]."""
    hot = concepts_at_patches(centre_labels, nearest.image_index, nearest.position, num_concepts)  # [m, k, C+1]
    if concept_subset is not None:
        hot = hot[..., list(concept_subset)]
    share = hot.float().mean(dim=1)                                                           # [m, C']
    return share.max(dim=1).values if share.shape[1] else torch.zeros(share.shape[0])


def class_object_hits(result: PushResult, source_segs: dict[int, torch.Tensor], class_concepts: dict[int, list[int]],
                      seg_size: tuple[int, int]) -> torch.Tensor:
    """[m] 1 where the prototype's source patch lies on the object of its class, 0 where not, NaN where the source
    image has no masks here or the prototype was not pushed. The object = pixels carrying every defining concept of
    the class (in any of the label maps); the patch = the high-activation box; it lies on the object when at least
    half of the box is object or at least half of the object is inside the box."""
    out = torch.full((result.prototypes.shape[0],), float("nan"))
    sy, sx = seg_size[0] / result.image_size, seg_size[1] / result.image_size
    for j in range(result.prototypes.shape[0]):  # m small masks, once per push: not a hot path
        idx = int(result.image_index[j])
        if not bool(result.pushed[j]) or idx not in source_segs:
            continue
        seg = source_segs[idx]                                            # [L, sh, sw]
        need = class_concepts.get(int(result.classes[j]), [])
        if not need:
            continue
        obj = torch.stack([(seg == c).any(dim=0) for c in need]).all(dim=0)
        y0, y1, x0, x1 = result.high_activation_box[j].tolist()
        y0, y1 = int(y0 * sy), max(int(y0 * sy) + 1, round(y1 * sy))
        x0, x1 = int(x0 * sx), max(int(x0 * sx) + 1, round(x1 * sx))
        inside = float(obj[y0:y1, x0:x1].sum())
        box_area, obj_area = (y1 - y0) * (x1 - x0), float(obj.sum())
        out[j] = float(obj_area > 0 and (inside >= 0.5 * box_area or inside >= 0.5 * obj_area))
    return out


def last_layer_sparsity(weight: torch.Tensor, tolerance: float = SPARSITY_TOLERANCE) -> float:
    w = weight.detach().abs()
    return float((w <= tolerance * w.max().clamp_min(1e-12)).float().mean())


# ----- the callback --------------------------------------------------------------------------------------------------
class PrototypeCallback(InterpretationCallback):
    """After every push (ProtoPNet only): gallery + records JSON, "this looks like that" panels, quality metrics;
    all in <run>/interp/prototypes/epoch_NNN/ and on W&B (interp/prototypes/...)."""

    name = "prototypes"

    def __init__(self, num_explained: int = 4, top_prototypes: int = 3, purity_k: int = 10,
                 probe_split: str = "train", probe_limit: int | None = 1000, thumbnail: int = 64,
                 classes_per_page: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.num_explained, self.top_prototypes = int(num_explained), int(top_prototypes)
        self.purity_k, self.probe_split = int(purity_k), probe_split
        self.probe_limit = None if probe_limit is None else int(probe_limit)
        self.thumbnail, self.classes_per_page = int(thumbnail), int(classes_per_page)

    def applies_to(self, module) -> bool:
        from models.protopnet import ProtoPNet
        return isinstance(module, ProtoPNet)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.enabled or not self.applies_to(pl_module):
            return
        history = pl_module.push_history
        if history and history[-1]["epoch"] == trainer.current_epoch and pl_module.last_push is not None:
            self.execute(trainer, pl_module)

    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        result: PushResult = module.last_push
        dm = self.datamodule(trainer)
        class_names = list(getattr(dm, "class_names", None) or [])
        metrics: dict[str, float] = {
            "pushed": float(result.pushed.sum()), "unique_sources": float(result.image_index[result.pushed].unique()
                                                                          .numel()),
            "mean_push_distance": float(result.distance[result.pushed].mean()) if result.pushed.any() else 0.0,
            "last_layer_sparsity": last_layer_sparsity(module.last_layer.weight),
            "active_prototypes": float(module.prototype_active.sum())}
        metrics["unique_source_fraction"] = metrics["unique_sources"] / max(1.0, metrics["pushed"])
        metrics.update(self.quality(module, dm, result))
        if self.is_rank_zero:
            out = self.epoch_dir(trainer, epoch)
            self.render(trainer, module, dm, result, out, class_names)
            write_json(out / "quality.json", {"epoch": epoch, **metrics})
        return metrics

    def render(self, trainer, module, dm, result: PushResult, out: Path, class_names: list[str]) -> None:
        train_vis = dm.vis_dataset("train")
        sources = {int(i): train_vis[int(i)][0] for i in result.image_index[result.pushed].unique().tolist()}
        write_json(out / "prototypes.json", {"push": module.push_history[-1],
                                             "prototypes": result.records(class_names)})
        pages = render_gallery(result, sources, out, class_names, self.thumbnail, self.classes_per_page)
        self.log_images(trainer, "gallery", pages)
        if self.num_explained <= 0:
            return
        test_vis = dm.vis_dataset("test")
        n = min(self.num_explained, len(test_vis))
        picks = np.linspace(0, len(test_vis) - 1, n).round().astype(int).tolist() if n else []
        items = [test_vis[i] for i in picks]
        x01 = torch.stack([it[0] for it in items])
        expl = explain(module, dm.normalize(x01).to(module.device), self.top_prototypes)
        expl = {k: v.cpu() for k, v in expl.items()}
        panels = [render_explanation(x01[i], int(items[i][1]), expl, i, result, sources,
                                     out / f"this_looks_like_that_{picks[i]:05d}.png", class_names)
                  for i in range(n)]
        self.log_images(trainer, "this_looks_like_that", panels)

    def quality(self, module, dm, result: PushResult) -> dict[str, float]:
        """Purity and class-object hit rate on the ground-truth masks of dm.probe_dataset(probe_split)."""
        probe = dm.probe_dataset(self.probe_split) if hasattr(dm, "probe_dataset") else None
        if probe is None:
            return {}
        if self.probe_limit is not None and len(probe) > self.probe_limit:
            probe = torch.utils.data.Subset(probe, range(self.probe_limit))
        base = probe.dataset if isinstance(probe, torch.utils.data.Subset) else probe
        num_concepts = int(base.num_concepts)
        with torch.no_grad():
            h, w = module.prototype_features(torch.zeros(1, module.channels, module.image_size, module.image_size,
                                                         device=module.device)).shape[-2:]
        rows, cols = cell_centres(tuple(base.seg_size), h, w)
        shard = self.shard(probe)
        seen_idx, seen_lab = [], []

        def batches():  # (image, label, index) for the search; cell-centre concept labels recorded on the way
            for item in self.loader(shard):
                seen_idx.append(item["index"].long())
                seen_lab.append(item["seg"][:, :, rows][:, :, :, cols].to(torch.int32))  # gloo has no int16
                yield item["image"], item["label"], item["index"]

        nearest = k_nearest_patches(module, batches(), k=self.purity_k)
        local_idx = torch.cat(seen_idx) if seen_idx else torch.zeros(0, dtype=torch.long)
        local_lab = (torch.cat(seen_lab) if seen_lab else
                     torch.zeros(0, int(getattr(base, "max_maps", 1)), h, w, dtype=torch.int32))
        dev = module.device
        all_idx = D.all_gather_cat(local_idx.to(dev)).cpu()
        all_lab = D.all_gather_cat(local_lab.to(dev)).cpu()
        centre_labels = torch.zeros(int(all_idx.max()) + 1 if len(all_idx) else 0, *all_lab.shape[1:],
                                    dtype=torch.int32)
        centre_labels[all_idx] = all_lab
        active = module.prototype_active.cpu()
        out = {"purity": float(purity(nearest, centre_labels, num_concepts)[active].mean())}
        for cat in getattr(base, "category_names", []):
            ids = [i for i, c in enumerate(base.concept_categories) if c == cat]
            if ids and cat != "scene":
                out[f"purity_{cat}"] = float(purity(nearest, centre_labels, num_concepts, ids)[active].mean())
        class_concepts = getattr(base, "class_concepts", None)
        if class_concepts and self.probe_split == "train":  # push sources index the train split
            # the sources' masks come from the whole split (m images), not only the purity subset
            sources = [int(i) for i in result.image_index[result.pushed].unique().tolist() if int(i) < len(base)]
            segs = {i: torch.as_tensor(base[i]["seg"]) for i in sources}
            hits = class_object_hits(result, segs, class_concepts, tuple(base.seg_size))
            hits = hits[active & ~hits.isnan()]
            if len(hits):
                out["class_object_hit_rate"] = float(hits.mean())
                out["hit_rate_coverage"] = float(len(hits) / max(1, int(active.sum())))
        return out
