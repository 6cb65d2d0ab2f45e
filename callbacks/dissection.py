"""Network Dissection (Bau et al., CVPR 2017; Zhou et al., PAMI 2018) of any named layer over a Broden-format
probe set, exact under DDP, with the Lightning callback that runs it after training epochs.

The algorithm (`dissect`, top of the file) is usable from a notebook:

    result = dissect(model, ["backbone.conv4"], DataLoader(probe, batch_size=64))["backbone.conv4"]
    result.labels()          # one row per unit: best concept, category, IoU
    result.summary()         # interpretable units, unique concepts, counts per category

Choices (the reference leaves them open; see docs/dissection.md):
- Threshold T_u: the exact `1 - quantile` (0.995) quantile of unit u's activations over the RAW h x w maps of the
  whole probe set, before upsampling (the NetDissect-Lite choice). "Exact" means equal to
  torch.quantile(acts_u.flatten(), 0.995) (linear interpolation): with n = N*h*w values, torch computes the rank
  r = q * (n - 1) in the activations' dtype and interpolates between the ascending order statistics floor(r) and
  ceil(r). Both lie among the k = n - floor(r) largest values, so each rank keeps only its own top-k per unit
  (k is about 0.005 * n + 1), the top-k lists are gathered, and the two order statistics are read off the global
  top-k. This also avoids torch.quantile's 16M-element input limit and never stores all activations.
- Masks: M_u = bilinear_upsample(A_u, seg size, align_corners=False) > T_u.
- IoU(u, c) = sum_images |M_u & L_c| / sum_images |M_u | L_c|. Intersections are the matrix product of the binary
  unit masks [U, pixels] with the one-hot concept masks [pixels, C], evaluated sparsely (only maps that reach T_u
  are upsampled, only their "on" pixels are counted, with one bincount); unions = |M_u| + |L_c| - intersection.
  All statistics are integer counts (exact in float32 within a batch, accumulated in float64) and all-reduced.
- An image-level label (e.g. scene) is a full-image mask; a pixel label of the same concept in that image is then
  covered by it and not counted twice (NetDissect-Lite's stale tally for such images is avoided).
"""
from __future__ import annotations

import csv
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from core import distributed as D
from callbacks.base import InterpretationCallback, InterpretationError, forward_hooks, write_json

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.04   # "interpretable" (Bau et al. 2017, Sec. 2.2)
TOP_QUANTILE = 0.005   # top 0.5% of activations are "on"


class DissectionError(ValueError):
    """Bad input to network dissection (layer, probe set); the message names the option and the fix."""


# ----- the probe set ------------------------------------------------------------------------------------------------

PROBE_ATTRIBUTES = ("concept_names", "concept_categories", "category_names")
PROBE_KEYS = ("image", "seg", "image_labels")


def check_probe_dataset(probe: Dataset, option: str = "probe") -> None:
    """A probe set must describe its concepts and yield Broden items (see datamodules/broden.py)."""
    missing = [a for a in PROBE_ATTRIBUTES if not hasattr(probe, a)]
    if missing:
        raise DissectionError(f"{option}: {type(probe).__name__} is not a Broden-format probe set; it lacks "
                              f"{', '.join(missing)} (a datamodules.broden.BrodenDataset has them)")
    if len(probe) == 0:
        raise DissectionError(f"{option}: the probe set is empty")
    item = probe[0]
    if not isinstance(item, dict) or any(k not in item for k in PROBE_KEYS):
        have = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise DissectionError(f"{option}: probe items must be dicts with {', '.join(PROBE_KEYS)}; got {have}")


def open_broden(path, split: str | None = "val", image_size=None, mean=None, std=None, limit: int | None = None):
    """A real Broden folder (e.g. broden1_224) as a probe set; a folder that is not Broden-format raises an error
    that says which of index.csv, label.csv, category.csv, images/ is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DissectionError(f"callbacks.dissection.probe={str(path)!r}: no such folder; give a Broden folder "
                              f"(index.csv, label.csv, category.csv, images/) or leave probe=null to use the "
                              f"datamodule's probe set")
    need = ["index.csv", "label.csv", "category.csv", "images"]
    missing = [n for n in need if not (root / n).exists()]
    if missing:
        raise DissectionError(f"callbacks.dissection.probe={str(path)!r} is not a Broden folder: {', '.join(missing)} "
                              f"missing (a Broden folder holds index.csv, label.csv, category.csv and images/; "
                              f"NetDissect's script/dlbroden.sh downloads broden1_224)")
    from datamodules.broden import BrodenDataset
    kwargs = {}
    if mean is not None and std is not None:
        kwargs.update(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    return BrodenDataset(root, split=split, image_size=image_size, limit=limit, cache=True, **kwargs)


# ----- the result ---------------------------------------------------------------------------------------------------

@dataclass
class DissectionResult:
    """Everything dissection measured for one layer; tensors on the CPU. Concept columns are indexed by concept id
    (column 0 = unlabelled, never a label)."""
    layer: str
    thresholds: torch.Tensor          # [U] T_u
    intersection: torch.Tensor        # [U, C+1] sum over images of |M_u & L_c|
    unit_area: torch.Tensor           # [U] sum over images of |M_u|
    concept_area: torch.Tensor        # [C+1] sum over images of |L_c|
    concept_names: list[str]
    concept_categories: list[str]
    category_names: list[str]
    num_images: int
    map_size: tuple[int, int]
    seg_size: tuple[int, int]
    top_images: torch.Tensor          # [U, n_top] probe indices of the maximally activating images
    top_scores: torch.Tensor          # [U, n_top] their max activation
    iou_threshold: float = IOU_THRESHOLD
    quantile: float = TOP_QUANTILE
    concept_feature_sum: torch.Tensor | None = None   # [C+1, U] sum of features weighted by concept coverage
    concept_weight: torch.Tensor | None = None        # [C+1] total coverage weight
    feature_sum: torch.Tensor | None = None           # [U] sum of features over all locations
    num_locations: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_units(self) -> int:
        return int(self.thresholds.numel())

    @property
    def union(self) -> torch.Tensor:
        return self.unit_area[:, None] + self.concept_area[None, :] - self.intersection

    @property
    def iou(self) -> torch.Tensor:
        """[U, C+1]; 0 where the union is empty; column 0 (unlabelled) is 0."""
        union = self.union
        iou = torch.where(union > 0, self.intersection / union.clamp_min(1), torch.zeros_like(union))
        iou[:, 0] = 0
        return iou

    @property
    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(best concept id [U], its IoU [U]); ties go to the lowest id."""
        iou = self.iou
        score, concept = iou.max(dim=1)
        return concept, score

    @property
    def interpretable(self) -> torch.Tensor:
        concept, score = self.best
        return (score >= self.iou_threshold) & (concept > 0)

    def unit_labels(self) -> list[str | None]:
        """Per unit: its concept name when interpretable, else None."""
        concept, _ = self.best
        ok = self.interpretable
        return [self.concept_names[c] if good else None for c, good in zip(concept.tolist(), ok.tolist())]

    def unit_concepts(self) -> torch.Tensor:
        """Per unit: its concept id when interpretable, else 0."""
        concept, _ = self.best
        return torch.where(self.interpretable, concept, torch.zeros_like(concept))

    def summary(self) -> dict[str, float]:
        """interpretable_units, unique_concepts, mean IoU of the best concepts and units per category."""
        concept, score = self.best
        ok = self.interpretable
        labelled = concept[ok].tolist()
        out = {"interpretable_units": float(ok.sum()), "unique_concepts": float(len(set(labelled))),
               "interpretable_fraction": float(ok.float().mean()) if self.num_units else 0.0,
               "mean_best_iou": float(score.mean()) if self.num_units else 0.0}
        for cat in self.category_names:
            out[f"category/{cat}"] = float(sum(self.concept_categories[c] == cat for c in labelled))
        return out

    def labels(self) -> list[dict[str, Any]]:
        """One record per unit in NetDissect's result-table layout: unit (1-based, as NetDissect numbers them;
        channel = unit - 1), category, label, score (IoU of the best concept), then per category the best concept of
        that category with its truth (concept area), activation (unit area), intersect and iou."""
        iou = self.iou
        concept, score = self.best
        cats = torch.tensor([self.category_names.index(c) if c in self.category_names else -1
                             for c in self.concept_categories])
        rows = []
        per_cat = {}
        for k, cat in enumerate(self.category_names):
            cols = (cats == k).nonzero().flatten()
            if len(cols):
                s, j = iou[:, cols].max(dim=1)
                per_cat[cat] = (cols[j], s)
        for u in range(self.num_units):
            c = int(concept[u])
            row = {"unit": u + 1, "category": self.concept_categories[c] if c else "",
                   "label": self.concept_names[c] if c else "-", "score": float(score[u]),
                   "interpretable": bool(score[u] >= self.iou_threshold and c > 0),
                   "threshold": float(self.thresholds[u])}
            for cat in self.category_names:
                if cat in per_cat:
                    cc, s = int(per_cat[cat][0][u]), float(per_cat[cat][1][u])
                    row.update({f"{cat}-label": self.concept_names[cc], f"{cat}-truth": float(self.concept_area[cc]),
                                f"{cat}-activation": float(self.unit_area[u]),
                                f"{cat}-intersect": float(self.intersection[u, cc]), f"{cat}-iou": s})
            rows.append(row)
        return rows

    def csv_columns(self) -> list[str]:
        cols = ["unit", "category", "label", "score"]
        for cat in self.category_names:
            if any(c == cat for c in self.concept_categories):
                cols += [f"{cat}-{k}" for k in ("label", "truth", "activation", "intersect", "iou")]
        return cols + ["interpretable", "threshold"]

    def write_csv(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.csv_columns(), extrasaction="ignore")
            w.writeheader()
            for row in self.labels():
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "num_units": self.num_units, "num_images": self.num_images,
                "map_size": list(self.map_size), "seg_size": list(self.seg_size),
                "threshold_rule": f"exact {1 - self.quantile:g} quantile per unit over raw {self.map_size[0]}x"
                                  f"{self.map_size[1]} maps (before upsampling), as torch.quantile",
                "iou_threshold": self.iou_threshold, "summary": self.summary(), "units": self.labels(),
                "top_images": self.top_images.tolist()}

    def concept_vectors(self) -> torch.Tensor | None:
        """[C+1, U] unit-norm concept directions in this layer's per-location feature space: the mean feature at the
        concept's locations minus the mean feature over all locations (a class-mean linear direction; row 0 and
        concepts never seen are 0). Used by Interpretable Basis Decomposition (callbacks/ibd.py)."""
        if self.concept_feature_sum is None or not self.num_locations:
            return None
        mean_all = self.feature_sum / self.num_locations
        w = self.concept_weight[:, None]
        q = torch.where(w > 0, self.concept_feature_sum / w.clamp_min(1e-12) - mean_all, torch.zeros_like(
            self.concept_feature_sum))
        q[0] = 0
        return F.normalize(q, dim=1)


# ----- the algorithm ------------------------------------------------------------------------------------------------

class PeerFailure(RuntimeError):
    """Another rank failed; raised on this rank at the same point so that every rank leaves the collectives together."""


def agree_on_failure(error: BaseException | None, device=None) -> None:
    """Every rank calls this at the same point after a local phase (which may fail on some ranks only): then either
    all ranks go on to the next collective, or all raise - none is left waiting in a collective."""
    if D.any_rank(error is not None, device=device or "cpu"):
        if error is not None:
            raise error
        raise PeerFailure("another rank failed (see its log)")


class _Stop(Exception):
    """Raised by the last hook: the layers below the probed ones need not be computed."""


def threshold_rank(n: int, quantile: float = TOP_QUANTILE, dtype=torch.float32) -> tuple[int, int, float, int]:
    """torch.quantile's order statistics for the (1 - quantile) quantile of n values: (lo, hi, weight, k) with lo/hi
    the ascending indices it interpolates between, the weight it uses and k = n - lo, the number of largest values
    that contain both."""
    q = 1.0 - quantile
    # torch.quantile's rank q * (n - 1), computed like torch does in the data's dtype: for large n the float32 rank
    # decides which order statistics are used, so the same rounding is needed to pick the same ones
    r = torch.tensor(q, dtype=dtype) * (n - 1)
    lo, hi = int(r.floor()), int(r.ceil())
    return lo, hi, float(r - lo), n - lo


def quantile_from_top(top_desc: torch.Tensor, n: int, quantile: float = TOP_QUANTILE) -> torch.Tensor:
    """Thresholds [U] from each unit's k largest values sorted descending [U, >=k] out of n values."""
    lo, hi, weight, k = threshold_rank(n, quantile, top_desc.dtype)
    below = top_desc[:, n - 1 - lo]
    above = top_desc[:, n - 1 - hi]
    return torch.lerp(below, above, torch.full_like(below, weight))


def exact_quantile(acts: torch.Tensor, quantile: float = TOP_QUANTILE) -> torch.Tensor:
    """acts [N, U, h, w] -> thresholds [U], equal to torch.quantile per unit, via top-k (the DDP-free form)."""
    flat = acts.transpose(0, 1).reshape(acts.shape[1], -1)
    k = threshold_rank(flat.shape[1], quantile)[3]
    return quantile_from_top(flat.topk(k, dim=1).values, flat.shape[1], quantile)


def concept_masks(seg: torch.Tensor, image_labels: torch.Tensor | None, num_concepts: int) -> torch.Tensor:
    """Dense one-hot concept masks [B, C+1, P] (float 0/1) from label maps [B, L, sh, sw] and image-level labels
    [B, C+1]: a pixel may carry several concepts (one per map); an image label covers the whole image."""
    b = seg.shape[0]
    flat = seg.reshape(b, seg.shape[1], -1).long()
    masks = torch.zeros(b, num_concepts + 1, flat.shape[2], device=seg.device)
    masks.scatter_(1, flat, 1.0)  # several maps with the same concept at a pixel still give one
    if image_labels is not None:
        masks = torch.maximum(masks, image_labels[:, : num_concepts + 1, None].to(masks.dtype))
    masks[:, 0] = 0
    return masks


def _dedup_pixel_labels(seg: torch.Tensor, image_labels: torch.Tensor | None) -> torch.Tensor:
    """Label maps [B, L, P] with repeats of a concept at a pixel (across maps) and pixels of image-level concepts
    zeroed, so that summing one-hot maps equals the union (the sparse path's equivalent of concept_masks)."""
    seg = seg.clone()
    for i in range(1, seg.shape[1]):
        dup = (seg[:, i:i + 1] == seg[:, :i]).any(dim=1)
        seg[:, i][dup] = 0
    if image_labels is not None and image_labels.any():
        covered = torch.gather(image_labels.bool(), 1, seg.reshape(seg.shape[0], -1)).reshape(seg.shape)
        seg[covered] = 0
    return seg


def iou_statistics(acts: torch.Tensor, thresholds: torch.Tensor, seg: torch.Tensor,
                   image_labels: torch.Tensor | None, num_concepts: int, chunk_pixels: int = 2 ** 23):
    """One batch's counts: (intersection [U, C+1], unit area [U], concept area [C+1]), all float64.

    acts [B, U, h, w]; seg [B, L, sh, sw] concept ids; image_labels bool [B, C+1] or None.

    The intersection matrix is the product of the binary unit masks [U, pixels] with the one-hot concept masks
    [pixels, C+1], evaluated sparsely: a bilinear upsample is a convex combination of the raw map, so a map whose
    maximum is <= T_u has an empty mask and is skipped, and of the remaining maps only the "on" pixels (about 0.5% of
    all) are looked up in the label maps and counted with one bincount over (unit, concept) pairs. The result is the
    same integer counts as the dense product at a small fraction of its cost, for any vocabulary size."""
    b, u = acts.shape[:2]
    sh, sw = seg.shape[-2:]
    p = sh * sw
    dev = acts.device
    c1 = num_concepts + 1
    labels = image_labels[:, :c1].bool() if image_labels is not None else None
    flat_seg = _dedup_pixel_labels(seg.reshape(b, -1, p).long(), labels)          # [B, L, P], union semantics
    concept_area = torch.bincount(flat_seg.reshape(-1), minlength=c1)[:c1].double()
    if labels is not None:
        concept_area += labels.sum(0).double() * p                                 # image-level = full image
    concept_area[0] = 0
    inter = torch.zeros(u * c1, dtype=torch.float64, device=dev)
    unit_area = torch.zeros(u, dtype=torch.float64, device=dev)
    a = acts.float()
    active = (a.amax(dim=(2, 3)) > thresholds.view(1, -1)).nonzero()               # (image, unit) pairs
    per = max(1, chunk_pixels // p)
    for s in range(0, len(active), per):
        bi, ui = active[s:s + per, 0], active[s:s + per, 1]
        up = F.interpolate(a[bi, ui][:, None], size=(sh, sw), mode="bilinear", align_corners=False)
        on = up.reshape(len(bi), p) > thresholds[ui][:, None]                       # M_u of those maps
        count = on.sum(1)
        unit_area.index_add_(0, ui, count.double())
        k, pix = on.nonzero(as_tuple=True)
        concepts = flat_seg[bi[k], :, pix]                                           # [on pixels, L]
        keys = (ui[k][:, None] * c1 + concepts).reshape(-1)
        inter += torch.bincount(keys, minlength=u * c1).double()
        if labels is not None:
            full = labels[bi].double() * count[:, None].double()                     # full-image masks
            inter.view(u, c1).index_add_(0, ui, full)
    inter = inter.view(u, c1)
    inter[:, 0] = 0
    return inter, unit_area, concept_area


def _merge_top(values: torch.Tensor | None, new: torch.Tensor, k: int) -> torch.Tensor:
    both = new if values is None else torch.cat([values, new], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1).values


def _merge_top_images(scores, index, new_scores, new_index, n):
    if scores is not None:
        new_scores, new_index = torch.cat([scores, new_scores], 1), torch.cat([index, new_index], 1)
    s, j = new_scores.topk(min(n, new_scores.shape[1]), dim=1)
    return s, torch.gather(new_index, 1, j)


def _layer_output(output, name: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise DissectionError(f"layer {name!r} returns {type(output).__name__}, not a tensor; dissection needs a "
                              f"layer whose output is a feature map [B, units, h, w]")
    if output.dim() != 4:
        raise DissectionError(f"layer {name!r} gives non-spatial maps of shape {list(output.shape)}; dissection "
                              f"needs spatial feature maps [B, units, h, w]: pick a convolutional layer "
                              f"(callbacks.dissection.layers)")
    return output


def resolve_layers(model: nn.Module, layers: str | Sequence[str] | None) -> "OrderedDict[str, nn.Module]":
    """Names -> modules through model.get_probe_layer (an unknown name raises an error listing the valid ones)."""
    if layers is None or layers == [] or layers == ():
        layers = [getattr(model, "default_probe_layer", "") or None]
    elif isinstance(layers, str):
        layers = [layers]
    out = OrderedDict()
    for name in layers:
        if hasattr(model, "get_probe_layer"):
            try:
                module = model.get_probe_layer(name)
            except Exception as err:
                raise DissectionError(f"callbacks.dissection.layers: {err}") from err
            name = name or next(n for n, m in model.probe_layers().items() if m is module)
        else:
            named = dict(model.named_modules())
            if name not in named:
                raise DissectionError(f"callbacks.dissection.layers: {name!r} is not a module of "
                                      f"{type(model).__name__}; available: {', '.join(n for n in named if n)}")
            module = named[name]
        out[name] = module
    return out


@torch.no_grad()
def dissect(model: nn.Module, layers: str | Sequence[str] | None, loader: Iterable[dict],
            concept_names: Sequence[str] | None = None, concept_categories: Sequence[str] | None = None,
            category_names: Sequence[str] | None = None, quantile: float = TOP_QUANTILE,
            iou_threshold: float = IOU_THRESHOLD, top_n: int = 8, cache_mb: float = 2048.0,
            concept_directions: bool = True, device=None,
            progress=None) -> "OrderedDict[str, DissectionResult]":
    """Dissect `layers` of `model` over the probe batches of `loader`; returns {layer name: DissectionResult}.

    The loader yields Broden items (dicts with image, seg, image_labels, index). Under torch.distributed each rank
    passes its own shard; thresholds, counts and top images are reduced so every rank returns the same result.
    One forward pass: the layer maps (and labels) are kept in memory for the IoU pass when they fit in `cache_mb`,
    otherwise the probe set is read a second time. Concept metadata defaults to the loader's dataset's attributes.
    """
    ds = getattr(loader, "dataset", None)
    base = ds
    while isinstance(base, Subset):
        base = base.dataset
    concept_names = list(concept_names if concept_names is not None else base.concept_names)
    concept_categories = list(concept_categories if concept_categories is not None else base.concept_categories)
    category_names = list(category_names if category_names is not None else base.category_names)
    num_concepts = len(concept_names) - 1
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    modules = resolve_layers(model, layers)
    names = list(modules)
    wrap = progress or (lambda it, desc: it)

    captured: dict[str, torch.Tensor] = {}
    by_module = {m: n for n, m in modules.items()}

    def hook(module, inputs, output):
        name = by_module[module]
        captured[name] = _layer_output(output, name)
        if len(captured) == len(modules):
            raise _Stop

    def forward(x):
        captured.clear()
        with forward_hooks(modules.values(), hook):
            try:
                model(x)
            except _Stop:
                pass
        missing = [n for n in names if n not in captured]
        if missing:
            raise DissectionError(f"layers {missing} were not reached by the forward pass of {type(model).__name__}")
        return dict(captured)

    # ---- pass 1: one forward; per-unit running top-k, top images; cache maps if they fit ----
    # k depends on the global number of values n = N * h * w: N is known up front (a collective every rank makes)
    local_len = len(ds) if ds is not None and hasattr(ds, "__len__") else -1
    total_len = int(D.all_reduce_sum(torch.tensor([max(local_len, 0)], device=device)).item())
    unknown = bool(D.any_rank(local_len < 0, device=device))
    top: dict[str, torch.Tensor | None] = {n: None for n in names}
    top_img: dict[str, Any] = {n: (None, None) for n in names}
    cache: list | None = []
    cache_bytes = 0.0
    n_local, map_sizes, seg_size = 0, {}, None
    error = None
    try:
        for batch in wrap(loader, "features"):
            x = batch["image"].to(device, non_blocking=True)
            feats = forward(x)
            b = x.shape[0]
            index = batch.get("index", torch.arange(n_local, n_local + b)).to(device).long()
            n_local += b
            seg_size = tuple(batch["seg"].shape[-2:])
            for n, a in feats.items():
                a = a.detach().float()
                map_sizes[n] = tuple(a.shape[-2:])
                flat = a.transpose(0, 1).reshape(a.shape[1], -1)
                # only the k largest values can be the threshold's order statistics (without a length: keep all)
                k = flat.shape[1] * n_local if unknown else threshold_rank(total_len * a.shape[2] * a.shape[3], quantile)[3]
                top[n] = _merge_top(top[n], flat, k)
                scores = a.amax(dim=(2, 3)).t()                        # [U, b] NetDissect ranks images by max activation
                top_img[n] = _merge_top_images(*top_img[n], scores, index.expand(a.shape[1], -1), top_n)
            if cache is not None:
                item = ({n: f.detach() for n, f in feats.items()}, batch["seg"], batch.get("image_labels"))
                cache_bytes += sum(f.numel() * f.element_size() for f in item[0].values()) + batch["seg"].numel() * 2
                if cache_bytes > cache_mb * 2 ** 20:
                    cache = None  # too large: read the probe set again in pass 2
                else:
                    cache.append(item)
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank together
        error = err
    agree_on_failure(error, device)
    if seg_size is None:
        # every rank must take part in the collectives below even with an empty shard; an empty whole set is an error
        seg_size = tuple(getattr(base, "seg_size", (1, 1)))
    n_images = int(D.all_reduce_sum(torch.tensor([n_local], device=device, dtype=torch.long)).item())
    if n_images == 0:
        raise DissectionError("the probe set is empty: nothing to dissect")

    results = OrderedDict()
    thresholds = {}
    for n in names:
        t = top[n]
        # all ranks agree on the map shape (same model, same image size); ranks with no data still need it
        shape = torch.tensor(list(map_sizes.get(n, (0, 0))) + [t.shape[0] if t is not None else 0], device=device)
        shape = D.all_reduce_max(shape)
        h, w, units = (int(v) for v in shape.tolist())
        total = n_images * h * w
        k = threshold_rank(total, quantile)[3]
        local = t[:, :k] if t is not None else torch.empty(units, 0, device=device)
        if local.shape[1] < k:  # pad with -inf so every rank gathers the same width
            local = torch.cat([local, local.new_full((units, k - local.shape[1]), -math.inf)], 1)
        gathered = D.all_gather_cat(local.contiguous(), dim=1)
        global_top = gathered.topk(k, dim=1).values
        thresholds[n] = quantile_from_top(global_top, total, quantile)

    # ---- pass 2: IoU counts (and concept directions) with the final thresholds ----
    stats = {n: None for n in names}
    directions = {n: None for n in names}

    def accumulate(feats, seg, image_labels):
        seg = seg.to(device)
        image_labels = image_labels.to(device) if image_labels is not None else None
        for n, a in feats.items():
            s = iou_statistics(a, thresholds[n], seg, image_labels, num_concepts)
            stats[n] = s if stats[n] is None else tuple(x + y for x, y in zip(stats[n], s))
            if concept_directions:
                d = _direction_sums(a, seg, image_labels, num_concepts)
                directions[n] = d if directions[n] is None else tuple(x + y for x, y in zip(directions[n], d))

    error = None
    try:
        if cache is not None:
            for feats, seg, image_labels in wrap(cache, "IoU"):
                accumulate(feats, seg, image_labels)
        else:
            for batch in wrap(loader, "IoU (second pass)"):
                accumulate(forward(batch["image"].to(device)), batch["seg"], batch.get("image_labels"))
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank together
        error = err
    agree_on_failure(error, device)

    for n in names:
        units = thresholds[n].numel()
        inter, unit_area, concept_area = stats[n] or (
            torch.zeros(units, num_concepts + 1, dtype=torch.float64, device=device),
            torch.zeros(units, dtype=torch.float64, device=device),
            torch.zeros(num_concepts + 1, dtype=torch.float64, device=device))
        # one all-reduce for all counts of the layer (they are sums over images)
        packed = D.all_reduce_sum(torch.cat([inter.flatten(), unit_area, concept_area]))
        inter = packed[: inter.numel()].view_as(inter)
        unit_area = packed[inter.numel(): inter.numel() + units]
        concept_area = packed[inter.numel() + units:]
        scores, index = top_img[n]
        if scores is None:
            scores = torch.full((units, 0), -math.inf, device=device)
            index = torch.zeros((units, 0), dtype=torch.long, device=device)
        if scores.shape[1] < top_n:
            pad = top_n - scores.shape[1]
            scores = torch.cat([scores, scores.new_full((units, pad), -math.inf)], 1)
            index = torch.cat([index, index.new_full((units, pad), -1)], 1)
        all_scores = D.all_gather_cat(scores.contiguous(), dim=1)
        all_index = D.all_gather_cat(index.contiguous(), dim=1)
        top_scores, j = all_scores.topk(min(top_n, n_images), dim=1)
        top_index = torch.gather(all_index, 1, j)
        h, w = map_sizes.get(n) or (0, 0)
        dirs = {}
        if concept_directions:
            c_sum, c_w, f_sum, n_loc = directions[n] or (
                torch.zeros(num_concepts + 1, units, dtype=torch.float64, device=device),
                torch.zeros(num_concepts + 1, dtype=torch.float64, device=device),
                torch.zeros(units, dtype=torch.float64, device=device),
                torch.zeros(1, dtype=torch.float64, device=device))
            packed = D.all_reduce_sum(torch.cat([c_sum.flatten(), c_w, f_sum, n_loc]))
            dirs = dict(concept_feature_sum=packed[: c_sum.numel()].view_as(c_sum).cpu(),
                        concept_weight=packed[c_sum.numel(): c_sum.numel() + c_w.numel()].cpu(),
                        feature_sum=packed[c_sum.numel() + c_w.numel(): -1].cpu(),
                        num_locations=int(packed[-1].item()))
        results[n] = DissectionResult(
            layer=n, thresholds=thresholds[n].cpu(), intersection=inter.cpu(), unit_area=unit_area.cpu(),
            concept_area=concept_area.cpu(), concept_names=concept_names, concept_categories=concept_categories,
            category_names=category_names, num_images=n_images, map_size=(h, w), seg_size=tuple(seg_size),
            top_images=top_index.cpu(), top_scores=top_scores.cpu(), iou_threshold=iou_threshold,
            quantile=quantile, **dirs)
    return results


def _direction_sums(acts: torch.Tensor, seg: torch.Tensor, image_labels, num_concepts: int):
    """Sufficient statistics of the per-concept mean feature at the layer's resolution: each location is weighted by
    the fraction of its cell's mask pixels the concept covers (a mask pixel belongs to the cell holding its centre;
    counted with one bincount, so the cost does not grow with the vocabulary)."""
    b, u, h, w = acts.shape
    sh, sw = seg.shape[-2:]
    c1 = num_concepts + 1
    labels = image_labels[:, :c1].bool() if image_labels is not None else None
    flat_seg = _dedup_pixel_labels(seg.reshape(b, -1, sh * sw).long(), labels)     # [B, L, P]
    rows = (torch.arange(sh, device=seg.device) * h) // sh
    cols = (torch.arange(sw, device=seg.device) * w) // sw
    cell = (rows[:, None] * w + cols[None, :]).reshape(-1)                          # [P] -> feature cell
    per_cell = (sh * sw) / (h * w)
    keys = ((torch.arange(b, device=seg.device)[:, None, None] * (h * w) + cell) * c1 + flat_seg).reshape(-1)
    cover = torch.bincount(keys, minlength=b * h * w * c1).view(b, h * w, c1).float() / per_cell
    if labels is not None:
        cover = cover + labels[:, None, :].float()
    cover[..., 0] = 0
    feats = acts.float().reshape(b, u, h * w)
    c_sum = torch.einsum("blc,bul->cu", cover, feats).double()
    return (c_sum, cover.sum(dim=(0, 1)).double(), feats.sum(dim=(0, 2)).double(),
            torch.tensor([b * h * w], dtype=torch.float64, device=acts.device))


@torch.no_grad()
def unit_maps(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The layer's maps [B, U, h, w] for a few images (used to draw the thresholded regions of top images)."""
    modules = resolve_layers(model, [layer])
    out = {}

    def hook(module, inputs, output):
        out["a"] = _layer_output(output, layer)
        raise _Stop

    with forward_hooks(modules.values(), hook):
        try:
            model(images)
        except _Stop:
            pass
    return out["a"]


# ----- rendering (rank 0) -------------------------------------------------------------------------------------------

def render_summary(result: DissectionResult, path: Path, title: str = "") -> Path:
    """Bar chart of interpretable units per category and a histogram of the best IoUs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result.summary()
    cats = [c for c in result.category_names]
    counts = [s.get(f"category/{c}", 0) for c in cats]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(cats, counts, color="tab:blue")
    axes[0].set_ylabel("interpretable units")
    axes[0].set_title(f"{int(s['interpretable_units'])}/{result.num_units} units, {int(s['unique_concepts'])} concepts")
    axes[0].tick_params(axis="x", rotation=30)
    _, score = result.best
    axes[1].hist(score.numpy(), bins=30, color="tab:gray")
    axes[1].axvline(result.iou_threshold, color="tab:red", ls="--", label=f"IoU {result.iou_threshold}")
    axes[1].set_xlabel("best IoU per unit")
    axes[1].legend()
    fig.suptitle(title or result.layer)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_gallery(model: nn.Module, result: DissectionResult, probe: Dataset, path: Path, units: int = 8,
                   images_per_unit: int = 5, device=None) -> Path:
    """The best `units` units (by IoU), each with its maximally activating probe images; outside the unit's
    thresholded region (upsampled map > T_u) the image is dimmed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    concept, score = result.best
    order = score.argsort(descending=True)[:units].tolist()
    n_img = min(images_per_unit, result.top_images.shape[1])
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    fig, axes = plt.subplots(max(1, len(order)), max(1, n_img), figsize=(1.6 * max(1, n_img), 1.7 * max(1, len(order))),
                             squeeze=False)
    for row, u in enumerate(order):
        idx = [i for i in result.top_images[u, :n_img].tolist() if i >= 0]
        items = [probe[i] for i in idx]
        if not items:
            continue
        images = torch.stack([it["image"] for it in items]).to(device)
        raw = torch.stack([it["raw"] if "raw" in it else it["image"] for it in items]).float()
        maps = unit_maps(model, result.layer, images)[:, u:u + 1].float().cpu()
        up = F.interpolate(maps, size=raw.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        region = (up > result.thresholds[u]).float()[:, None]
        shown = (raw * (0.3 + 0.7 * region)).clamp(0, 1)
        for col in range(n_img):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(items):
                img = shown[col].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
                ax.contour(region[col, 0].numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        label = result.concept_names[int(concept[u])] if int(concept[u]) else "-"
        axes[row, 0].set_title(f"unit {u + 1}: {label} ({float(score[u]):.3f})", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----- the callback -------------------------------------------------------------------------------------------------

class DissectionCallback(InterpretationCallback):
    """Dissects `layers` (default: the model's default probe layer) every `every_n_epochs` epochs.

    probe: null -> `datamodule.probe_dataset(probe_split)` (skipped with a warning when the data has no concept
    annotations); a path -> a real Broden folder. probe_size: the first N probe images (null = all).
    Outputs in <run>/interp/dissection/epoch_NNN/: <layer>.csv (NetDissect columns), dissection.json,
    <layer>_summary.png, <layer>_gallery.png; W&B: a table per layer and the PNGs; scalars
    interp/dissection/{interpretable_units, unique_concepts, interpretable_fraction, mean_best_iou, category/<c>}
    for the first layer and <layer>/<metric> for every layer when several are dissected.
    """

    name = "dissection"

    def __init__(self, layers: str | Sequence[str] | None = None, probe: str | None = None,
                 probe_split: str = "val", probe_size: int | None = 300, quantile: float = TOP_QUANTILE,
                 iou_threshold: float = IOU_THRESHOLD, top_images: int = 5, gallery_units: int = 8,
                 render_every_n_runs: int = 1, cache_mb: float = 2048.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 < quantile < 1:
            raise DissectionError(f"callbacks.dissection.quantile={quantile}: must be in (0, 1) (0.005 = top 0.5%)")
        if probe_size is not None and int(probe_size) < 1:
            raise DissectionError(f"callbacks.dissection.probe_size={probe_size}: must be >= 1 or null (all)")
        self.layers = [layers] if isinstance(layers, str) else (list(layers) if layers else None)
        self.probe, self.probe_split = probe, probe_split
        self.probe_size = None if probe_size is None else int(probe_size)
        self.quantile, self.iou_threshold = float(quantile), float(iou_threshold)
        self.top_images, self.gallery_units = int(top_images), int(gallery_units)
        self.render_every_n_runs = max(1, int(render_every_n_runs))
        self.cache_mb = float(cache_mb)
        self._probe_cache: Dataset | None = None
        self._warned = False
        self.results: "OrderedDict[str, DissectionResult]" = OrderedDict()
        self.results_epoch: int | None = None
        self.num_runs = 0

    # the probe set is resolved once per fit; a bad path fails the run at the first dissection on every rank
    def probe_dataset(self, trainer) -> Dataset | None:
        if self._probe_cache is not None:
            return self._probe_cache
        dm = getattr(trainer, "datamodule", None)
        if self.probe:
            probe = open_broden(self.probe, split=self.probe_split, image_size=getattr(dm, "image_size", None),
                                mean=getattr(dm, "mean", None), std=getattr(dm, "std", None), limit=self.probe_size)
        else:
            getter = getattr(dm, "probe_dataset", None)
            probe = getter(self.probe_split) if callable(getter) else None
            if probe is None:
                return None
        check_probe_dataset(probe, "callbacks.dissection.probe")
        if self.probe_size is not None and len(probe) > self.probe_size:
            probe = _ProbeView(probe, range(self.probe_size))
        self._probe_cache = probe
        return probe

    def run(self, trainer, module, epoch):
        probe, error = None, None
        try:
            probe = self.probe_dataset(trainer)
            if probe is not None:
                self.check_input_format(probe, module)
        except Exception as err:  # noqa: BLE001 - raised on every rank together
            error = err
        agree_on_failure(error, module.device)
        if probe is None:
            if not self._warned:
                log.warning("dissection skipped: %s has no concept probe set; set callbacks.dissection.probe=<Broden "
                            "folder> or use datamodule=shapes", type(getattr(trainer, "datamodule", None)).__name__)
                self._warned = True
            return {}
        results = dissect(module, self.layers, self.loader(self.shard(probe)), quantile=self.quantile,
                          iou_threshold=self.iou_threshold, top_n=self.top_images, cache_mb=self.cache_mb,
                          progress=lambda it, desc: self.progress(it, desc))
        self.results, self.results_epoch = results, epoch
        self.num_runs += 1
        if self.is_rank_zero:
            self.write_outputs(trainer, module, results, probe, epoch)
        metrics = {}
        for i, (layer, res) in enumerate(results.items()):
            s = res.summary()
            if i == 0:
                metrics.update(s)
            if len(results) > 1:
                metrics.update({f"{layer}/{k}": v for k, v in s.items()})
        return metrics

    @staticmethod
    def check_input_format(probe, module):
        channels = probe[0]["image"].shape[0]
        if getattr(module, "channels", channels) != channels:
            raise DissectionError(f"callbacks.dissection.probe: probe images have {channels} channels but the model "
                                  f"takes {module.channels}; use a probe set in the model's input format")

    def write_outputs(self, trainer, module, results, probe, epoch):
        out = self.epoch_dir(trainer, epoch)
        write_json(out / "dissection.json", {"epoch": epoch, "layers": {n: r.to_json() for n, r in results.items()}})
        render = (self.num_runs - 1) % self.render_every_n_runs == 0 or self._is_last(trainer)
        images = []
        for layer, res in results.items():
            res.write_csv(out / f"{_safe(layer)}.csv")
            rows = [[r["unit"], r["category"], r["label"], round(r["score"], 5), r["interpretable"]]
                    for r in res.labels()]
            self.log_table(trainer, f"{_safe(layer)}/units", ["unit", "category", "label", "score", "interpretable"],
                           rows)
            if render:
                images.append(render_summary(res, out / f"{_safe(layer)}_summary.png", f"{layer}, epoch {epoch}"))
                if self.gallery_units > 0:
                    images.append(render_gallery(module, res, probe, out / f"{_safe(layer)}_gallery.png",
                                                 self.gallery_units, self.top_images))
        if images:
            self.log_images(trainer, "summary", images)

    @staticmethod
    def _is_last(trainer) -> bool:
        return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs


class _ProbeView(Subset):
    """The first N items of a probe set that keeps its concept attributes visible (Subset hides them)."""

    def __getattr__(self, name):
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _safe(name: str) -> str:
    return name.replace("/", "_")
