"""Network Dissection (Bau et al., CVPR 2017; Zhou et al., PAMI 2018) of any named layers over a Broden-format probe
set, exact under DDP. Plain code (no Lightning): callbacks/dissection.py schedules it, shards the probe set and writes
the outputs.

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

import math
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from algorithms.dissection_result import DissectionEpoch, DissectionResult  # noqa: F401 (re-exported)
from algorithms.dissection_stats import (IOU_THRESHOLD, TOP_QUANTILE, concept_masks,  # noqa: F401 (re-exported)
                                         direction_sums, exact_quantile, gathered_quantiles, gathered_top,
                                         iou_statistics, quantile_from_top, reduce_sums, threshold_rank, union_labels)
from algorithms.probe_pass import batch_maps
from algorithms.probe_sets import (DissectionError, base_dataset, check_probe_dataset,  # noqa: F401 (re-exported)
                                   open_broden)
from core import distributed as D
from core import probe as P


def spatial(acts: torch.Tensor, name: str) -> torch.Tensor:
    """Dissection needs feature maps [B, units, h, w]."""
    if acts.dim() != 4:
        raise DissectionError(f"layer {name!r} gives non-spatial maps of shape {list(acts.shape)}; dissection "
                              f"needs spatial feature maps [B, units, h, w]: pick a convolutional layer "
                              f"(callbacks.dissection.layers)")
    return acts


def layer_maps(model: nn.Module, points: Mapping[str, P.HookPoint], x: torch.Tensor) -> "OrderedDict[str, Any]":
    """The maps of every layer in `points` from one forward pass that stops after the last of them."""
    acts = P.capture(model, None, x, points=points).acts
    return OrderedDict((n, spatial(a, n)) for n, a in acts.items())


def probe_maps(model: nn.Module, points: Mapping[str, P.HookPoint], batch: dict) -> "OrderedDict[str, Any]":
    """A probe batch's maps: those of the epoch's shared probe pass (algorithms/probe_pass.py), else computed."""
    return OrderedDict((n, spatial(a, n)) for n, a in batch_maps(model, points, batch).items())


def batch_union(batch: dict, num_concepts: int, device) -> torch.Tensor:
    """The probe batch's `union_labels`, kept in the batch under "seg_union" for every layer and statistic: computed
    when absent (the dissection callback computes it once per fit, when its probe batches are collated:
    `CollatedBatches.read(prepare=...)`; a ProbePass batch inherits it)."""
    union = batch.get("seg_union")
    if union is None:
        labels = batch.get("image_labels")
        union = union_labels(batch["seg"].to(device), labels.to(device) if labels is not None else None, num_concepts)
        batch["seg_union"] = union
    return union.to(device)


def _merge_top(values: torch.Tensor | None, new: torch.Tensor, k: int) -> torch.Tensor:
    both = new if values is None else torch.cat([values, new], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1).values


def _merge_top_images(scores, index, new_scores, new_index, n):
    if scores is not None:
        new_scores, new_index = torch.cat([scores, new_scores], 1), torch.cat([index, new_index], 1)
    s, j = new_scores.topk(min(n, new_scores.shape[1]), dim=1)
    return s, torch.gather(new_index, 1, j)


@torch.no_grad()
def dissect(model: nn.Module, layers: str | Sequence[str] | None, loader: Iterable[dict],
            concept_names: Sequence[str] | None = None, concept_categories: Sequence[str] | None = None,
            category_names: Sequence[str] | None = None, quantile: float = TOP_QUANTILE,
            iou_threshold: float = IOU_THRESHOLD, top_n: int = 8, cache_mb: float = 2048.0,
            concept_directions: bool = True, device=None, progress=None,
            option: str = "layers") -> "OrderedDict[str, DissectionResult]":
    """Dissect `layers` of `model` (probe layer names, core/protocol.py; None = the default probe layer) over the
    probe batches of `loader`; returns {layer name: DissectionResult}.

    The loader yields Broden items (dicts with image, seg, image_labels, index; with "maps" when it is the epoch's
    shared algorithms.probe_pass.ProbePass, whose maps are used instead of a forward pass). Under torch.distributed
    each rank passes its own shard; thresholds, counts and top images are reduced so every rank returns the same result.
    One forward pass: the layer maps (and labels) are kept in memory for the IoU pass when they fit in `cache_mb`,
    otherwise the probe set is read a second time. Concept metadata defaults to the loader's dataset's attributes.
    An unknown layer name raises a ConfigError naming `option` and the valid names.
    """
    ds = getattr(loader, "dataset", None)
    base = base_dataset(ds)
    concept_names = list(concept_names if concept_names is not None else base.concept_names)
    concept_categories = list(concept_categories if concept_categories is not None else base.concept_categories)
    category_names = list(category_names if category_names is not None else base.category_names)
    num_concepts = len(concept_names) - 1
    device = device or P.model_device(model)
    points = P.resolve(model, layers, option=option)
    names = list(points)
    wrap = progress or (lambda it, desc: it)

    # ---- pass 1: one forward; per-unit running top-k, top images; cache maps if they fit ----
    # k depends on the global number of values n = N * h * w: N is known up front (a collective every rank makes)
    local_len = len(ds) if ds is not None and hasattr(ds, "__len__") else -1
    total_len = int(D.all_reduce_sum(torch.tensor([max(local_len, 0)], device=device)).item())
    unknown = bool(D.agree_any(local_len < 0, device=device))
    top: dict[str, torch.Tensor | None] = {n: None for n in names}
    top_img: dict[str, Any] = {n: (None, None) for n in names}
    cache: list | None = []
    cache_bytes = 0.0
    n_local, map_sizes, seg_size = 0, {}, None
    error = None
    try:
        for batch in wrap(loader, "features"):
            x = batch["image"].to(device, non_blocking=True)
            feats = probe_maps(model, points, batch)
            b = x.shape[0]
            index = batch.get("index", torch.arange(n_local, n_local + b)).to(device).long()
            n_local += b
            seg_size = tuple(batch["seg"].shape[-2:])
            for n, a in feats.items():
                a = a.detach().float()
                map_sizes[n] = tuple(a.shape[-2:])
                flat = a.transpose(0, 1).reshape(a.shape[1], -1)
                # only the k largest values can be the threshold's order statistics (without a length: keep all)
                k = (flat.shape[1] * n_local if unknown
                     else threshold_rank(total_len * a.shape[2] * a.shape[3], quantile)[3])
                top[n] = _merge_top(top[n], flat, k)
                scores = a.amax(dim=(2, 3)).t()        # [U, b]: NetDissect ranks images by their max activation
                top_img[n] = _merge_top_images(*top_img[n], scores, index.expand(a.shape[1], -1), top_n)
            if cache is not None:
                item = ({n: f.detach() for n, f in feats.items()}, batch["seg"], batch.get("image_labels"),
                        batch_union(batch, num_concepts, device))
                cache_bytes += sum(f.numel() * f.element_size() for f in item[0].values()) + batch["seg"].numel() * 2
                cache_bytes += item[3].numel() * item[3].element_size()
                if cache_bytes > cache_mb * 2 ** 20:
                    cache = None  # too large: read the probe set again in pass 2
                else:
                    cache.append(item)
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank together
        error = err
    D.raise_together(error, device)
    if seg_size is None:
        # every rank must take part in the collectives below even with an empty shard; an empty whole set is an error
        seg_size = tuple(getattr(base, "seg_size", (1, 1)))
    n_images = int(D.all_reduce_sum(torch.tensor([n_local], device=device, dtype=torch.long)).item())
    if n_images == 0:
        raise DissectionError("the probe set is empty: nothing to dissect")

    thresholds = {}
    for n in names:
        t = top[n]
        # all ranks agree on the map shape (same model, same image size); ranks with no data still need it
        shape = torch.tensor(list(map_sizes.get(n, (0, 0))) + [t.shape[0] if t is not None else 0], device=device)
        shape = D.all_reduce_max(shape)
        h, w, units = (int(v) for v in shape.tolist())
        local = t if t is not None else torch.empty(units, 0, device=device)
        thresholds[n] = gathered_quantiles(local, n_images * h * w, [quantile])[0]

    # ---- pass 2: IoU counts (and concept directions) with the final thresholds ----
    stats = {n: None for n in names}
    directions = {n: None for n in names}

    def accumulate(feats, seg, image_labels, union):
        seg = seg.to(device)
        image_labels = image_labels.to(device) if image_labels is not None else None
        for n, a in feats.items():
            s = iou_statistics(a, thresholds[n], seg, image_labels, num_concepts, union=union)
            stats[n] = s if stats[n] is None else tuple(x + y for x, y in zip(stats[n], s))
            if concept_directions:
                d = direction_sums(a, seg, image_labels, num_concepts, union=union)
                directions[n] = d if directions[n] is None else tuple(x + y for x, y in zip(directions[n], d))

    error = None
    try:
        if cache is not None:
            for feats, seg, image_labels, union in wrap(cache, "IoU"):
                accumulate(feats, seg, image_labels, union)
        else:
            for batch in wrap(loader, "IoU (second pass)"):
                accumulate(probe_maps(model, points, batch), batch["seg"], batch.get("image_labels"),
                           batch_union(batch, num_concepts, device))
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank together
        error = err
    D.raise_together(error, device)

    results = OrderedDict()
    for n in names:
        units = thresholds[n].numel()
        inter, unit_area, concept_area = stats[n] or (
            torch.zeros(units, num_concepts + 1, dtype=torch.float64, device=device),
            torch.zeros(units, dtype=torch.float64, device=device),
            torch.zeros(num_concepts + 1, dtype=torch.float64, device=device))
        inter, unit_area, concept_area = reduce_sums(inter, unit_area, concept_area)
        scores, index = top_img[n]
        if scores is None:
            scores = torch.full((units, 0), -math.inf, device=device)
            index = torch.zeros((units, 0), dtype=torch.long, device=device)
        top_scores, top_index = gathered_top(scores, index, top_n, n_images)
        h, w = map_sizes.get(n) or (0, 0)
        dirs = {}
        if concept_directions:
            c_sum, c_w, f_sum, n_loc = directions[n] or (
                torch.zeros(num_concepts + 1, units, dtype=torch.float64, device=device),
                torch.zeros(num_concepts + 1, dtype=torch.float64, device=device),
                torch.zeros(units, dtype=torch.float64, device=device),
                torch.zeros(1, dtype=torch.float64, device=device))
            c_sum, c_w, f_sum, n_loc = reduce_sums(c_sum, c_w, f_sum, n_loc)
            dirs = dict(concept_feature_sum=c_sum.cpu(), concept_weight=c_w.cpu(), feature_sum=f_sum.cpu(),
                        num_locations=int(n_loc.item()))
        results[n] = DissectionResult(
            layer=n, thresholds=thresholds[n].cpu(), intersection=inter.cpu(), unit_area=unit_area.cpu(),
            concept_area=concept_area.cpu(), concept_names=concept_names, concept_categories=concept_categories,
            category_names=category_names, num_images=n_images, map_size=(h, w), seg_size=tuple(seg_size),
            top_images=top_index.cpu(), top_scores=top_scores.cpu(), iou_threshold=iou_threshold,
            quantile=quantile, **dirs)
    return results


@torch.no_grad()
def unit_maps(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The layer's maps [B, U, h, w] for a few images (used to draw the thresholded regions of top images)."""
    points = P.resolve(model, layer)
    return layer_maps(model, points, images)[next(iter(points))]
