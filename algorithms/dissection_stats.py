"""The statistics of network dissection (Bau et al., CVPR 2017), as tensor functions: exact quantile thresholds from
per-unit top-k lists, IoU counts of thresholded unit maps against concept masks, and the per-concept feature sums of
the IBD concept vectors. algorithms/dissection.py runs them over a probe set, algorithms/gan/dissection.py over
generated samples. Under DDP each rank holds its shard's values: every count is a sum over images, all-reduced
exactly (`reduce_sums`), and the thresholds and top images come from the gathered per-unit top-k lists
(`gathered_quantiles`, `gathered_top`), so every rank ends with the single-process result.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from core import distributed as D

IOU_THRESHOLD = 0.04   # "interpretable" (Bau et al. 2017, Sec. 2.2)
TOP_QUANTILE = 0.005   # top 0.5% of activations are "on"


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


def gathered_quantiles(local_top: torch.Tensor, total: int, quantiles: Sequence[float]) -> torch.Tensor:
    """Exact thresholds [Q, U] (as exact_quantile) of the values of all ranks together, n = `total` of them, from each
    rank's largest values per unit sorted descending [U, m] (any m >= 0: a short or empty shard is padded with -inf).
    Only the k largest values can be an order statistic of a top quantile, so each rank sends k per unit."""
    k = max(threshold_rank(total, q, local_top.dtype)[3] for q in quantiles)
    local = local_top[:, :k]
    if local.shape[1] < k:  # every rank gathers the same width
        local = torch.cat([local, local.new_full((local.shape[0], k - local.shape[1]), -math.inf)], 1)
    top = D.all_gather_cat(local.contiguous(), dim=1).topk(k, dim=1).values
    return torch.stack([quantile_from_top(top, total, q) for q in quantiles])


def gathered_top(scores: torch.Tensor, index: torch.Tensor, n: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best (score, image index) pairs per unit over all ranks, [U, min(n, total)] each, from each rank's
    candidates scores/index [U, m] (index = the image's global index; any m >= 0, padded to n)."""
    if scores.shape[1] < n:
        pad = n - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -math.inf)], 1)
        index = torch.cat([index, index.new_full((index.shape[0], pad), -1)], 1)
    all_scores = D.all_gather_cat(scores.contiguous(), dim=1)
    all_index = D.all_gather_cat(index.contiguous(), dim=1)
    top, j = all_scores.topk(min(n, total), dim=1)
    return top, torch.gather(all_index, 1, j)


def reduce_sums(*sums: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over ranks, with one all-reduce for all of them (they are sums over images)."""
    packed = D.all_reduce_sum(torch.cat([t.flatten() for t in sums]))
    return [part.view_as(t) for part, t in zip(packed.split([t.numel() for t in sums]), sums)]


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


def dedup_pixel_labels(seg: torch.Tensor, image_labels: torch.Tensor | None) -> torch.Tensor:
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


def union_labels(seg: torch.Tensor, image_labels: torch.Tensor | None, num_concepts: int) -> torch.Tensor:
    """`dedup_pixel_labels` of a probe batch's label maps seg [B, L, sh, sw] -> [B, L, sh*sw] long: what
    `iou_statistics` and `direction_sums` count. It depends on the labels alone, so a caller that dissects several
    layers, or the same probe set every epoch, computes it once and passes it as `union`."""
    labels = image_labels[:, : num_concepts + 1].bool() if image_labels is not None else None
    return dedup_pixel_labels(seg.reshape(seg.shape[0], seg.shape[1], -1).long(), labels)


def iou_statistics(acts: torch.Tensor, thresholds: torch.Tensor, seg: torch.Tensor,
                   image_labels: torch.Tensor | None, num_concepts: int, chunk_pixels: int = 2 ** 23,
                   union: torch.Tensor | None = None):
    """One batch's counts: (intersection [U, C+1], unit area [U], concept area [C+1]), all float64.

    acts [B, U, h, w]; seg [B, L, sh, sw] concept ids; image_labels bool [B, C+1] or None; `union`: the batch's
    `union_labels` when the caller has them already.

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
    flat_seg = union_labels(seg, image_labels, num_concepts) if union is None else union  # [B, L, P], union
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
        unit_area += torch.bincount(ui, weights=count.double(), minlength=u)
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


def direction_sums(acts: torch.Tensor, seg: torch.Tensor, image_labels, num_concepts: int,
                   union: torch.Tensor | None = None):
    """Sufficient statistics of the per-concept mean feature at the layer's resolution: each location is weighted by
    the fraction of its cell's mask pixels the concept covers (a mask pixel belongs to the cell holding its centre;
    counted with one bincount, so the cost does not grow with the vocabulary). `union`: as for iou_statistics."""
    b, u, h, w = acts.shape
    sh, sw = seg.shape[-2:]
    c1 = num_concepts + 1
    labels = image_labels[:, :c1].bool() if image_labels is not None else None
    flat_seg = union_labels(seg, image_labels, num_concepts) if union is None else union  # [B, L, P]
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
