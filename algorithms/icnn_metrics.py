"""The interpretable CNN's two metrics (Zhang et al., CVPR 2018, Sec. 4.3), computed exactly on a concept data set with
part masks and part landmarks (`shapes`), for the filters of any probe layer of any model (core/protocol.py):

- location instability (lower is better): for each filter its top-K images by max activation; the receptive-field
  centre p_hat of the peak; for each part landmark p_k, d = ||p_k - p_hat||; D_f,k = standard deviation of d over
  those images; averaged over landmarks and filters and divided by the image diagonal.
- part interpretability (higher is better, network-dissection style): each filter's map thresholded at its top 0.5%
  activation quantile (over all images and positions), upsampled to the mask size; for every part, the share of
  the images showing that part where the IoU of the thresholded map with the part mask exceeds 0.2; a filter's
  score is that share for its best part; averaged over filters.

The functions take tensors (or a model, a layer and images) and return tensors, usable from a notebook;
`measure_filters(model, layer, probe, batches)` runs both over a probe set (under DDP: this rank's shard, with the
global result on every rank) and `ICNNMetricsResult.build(...)` is the typed result (icnn_metrics.json). Figures:
algorithms/icnn_metrics_render.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core import distributed as D
from core.probe import HookPoint, capture, model_device, resolve_one
from core.results import Result

ACTIVATION_QUANTILE = 0.995   # "top 0.5% activation quantile" (network dissection)
IOU_THRESHOLD = 0.2
TOP_IMAGES = 100


# ----- the maps -------------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_maps(model, layer: str | nn.Module | HookPoint | None, images: torch.Tensor,
               option: str = "layer") -> torch.Tensor:
    """[B, C, h, w] output of a probe layer (a name such as "icnn.filters1" or "backbone.conv4:pre_relu", a module,
    a resolved HookPoint, or None for the model's default) when `model` classifies `images` (core.probe.capture: the
    forward pass stops after the layer)."""
    point = layer if isinstance(layer, HookPoint) else resolve_one(model, layer, option)
    maps = capture(model, None, images, points={point.name: point}).acts[point.name]
    if maps.dim() != 4:
        raise ValueError(f"probe layer {point.name!r} outputs shape {tuple(maps.shape)}; the icnn metrics need a "
                         f"[B, C, h, w] feature map")
    return maps


# ----- the metrics ----------------------------------------------------------------------------------------------
def peak_positions(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [N, C, h, w] -> (peak value [N, C], flattened argmax [N, C])."""
    values, index = maps.flatten(2).max(dim=2)
    return values, index


def receptive_field_centres(flat_index: torch.Tensor, map_size: tuple[int, int],
                            image_size: tuple[int, int]) -> torch.Tensor:
    """[..., 2] (x, y) receptive-field centres of map positions (row-major flattened), in pixel-index coordinates
    (pixel k is centred at k, as the shapes landmarks). A unit (i, j) of an h x w map over an H x W image with 'same'
    padding and stride H/h covers pixels [i H/h, (i + 1) H/h), so its centre is ((j + 0.5) W/w - 0.5,
    (i + 0.5) H/h - 0.5)."""
    h, w = map_size
    H, W = image_size
    i = torch.div(flat_index, w, rounding_mode="floor").to(torch.float32)
    j = (flat_index % w).to(torch.float32)
    return torch.stack([(j + 0.5) * W / w - 0.5, (i + 0.5) * H / h - 0.5], dim=-1)


def location_instability(peak_values: torch.Tensor, peak_xy: torch.Tensor, landmarks: torch.Tensor,
                         image_size: tuple[int, int], top_k: int = TOP_IMAGES) -> dict[str, torch.Tensor]:
    """peak_values [N, C], peak_xy [N, C, 2] (receptive-field centres), landmarks [N, P, 2] (NaN where absent).

    For each filter its top_k images by peak value (images where the filter is silent, peak <= 0, have no peak and
    are left out); D_f,k = population standard deviation over those images of ||p_k - p_hat|| for every landmark
    seen in >= 2 of them. Returns `score` (mean over filters of the mean over landmarks, divided by the image
    diagonal; NaN when no filter qualifies), `per_filter` [C] (already divided; NaN for filters without a defined
    value) and `top_index` [C, K] (image indices, best first)."""
    n, c = peak_values.shape
    k = min(int(top_k), n)
    top_values, top_index = peak_values.t().topk(k, dim=1)                         # [C, K]
    p_hat = peak_xy.permute(1, 0, 2).gather(1, top_index[..., None].expand(-1, -1, 2))   # [C, K, 2]
    lm = landmarks[top_index]                                                      # [C, K, P, 2]
    d = (lm - p_hat[:, :, None, :]).norm(dim=-1)                                   # [C, K, P]
    valid = ~torch.isnan(d) & (top_values > 0)[..., None]
    count = valid.sum(dim=1)                                                       # [C, P]
    d0 = torch.where(valid, d, torch.zeros_like(d))
    mean = d0.sum(dim=1) / count.clamp(min=1)
    var = torch.where(valid, (d0 - mean[:, None]) ** 2, torch.zeros_like(d)).sum(dim=1) / count.clamp(min=1)
    std = torch.where(count >= 2, var.sqrt(), torch.full_like(var, float("nan")))   # [C, P]
    diagonal = math.hypot(*image_size)
    per_filter = std.nanmean(dim=1) / diagonal                                     # NaN when no landmark qualifies
    score = per_filter.nanmean() if bool((~per_filter.isnan()).any()) else per_filter.new_tensor(float("nan"))
    return {"score": score, "per_filter": per_filter, "top_index": top_index, "top_values": top_values}


def activation_thresholds(maps: torch.Tensor, quantile: float = ACTIVATION_QUANTILE) -> torch.Tensor:
    """[C]: each filter's `quantile` of its activations over all images and positions of maps [N, C, h, w] (linear
    interpolation, as torch.quantile, which refuses inputs above 16M elements)."""
    values = maps.transpose(0, 1).reshape(maps.shape[1], -1).sort(dim=1).values
    pos = quantile * (values.shape[1] - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return values[:, lo] + (values[:, hi] - values[:, lo]) * (pos - lo)


def interpolation_matrix(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """[size_out, size_in]: 1-D linear interpolation as F.interpolate(mode="linear", align_corners=False) does it."""
    eye = torch.eye(size_in, device=device)[None]                                   # [1, in (channels), in]
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].t()


def bilinear_upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(maps, size, mode="bilinear", align_corners=False) as two small matmuls (bilinear is separable);
    several times faster on CPU for many small maps."""
    ry = interpolation_matrix(maps.shape[-2], size[0], maps.device)
    rx = interpolation_matrix(maps.shape[-1], size[1], maps.device)
    return ry @ maps @ rx.t()


def part_masks(seg: torch.Tensor, part_concept_ids: torch.Tensor) -> torch.Tensor:
    """seg [B, L, sh, sw] concept ids -> [B, P, sh, sw] bool, one mask per part concept."""
    ids = part_concept_ids.to(seg.device).view(1, 1, -1, 1, 1)
    return (seg[:, :, None] == ids).any(dim=1)


def part_iou_hits(maps: torch.Tensor, thresholds: torch.Tensor, masks: torch.Tensor,
                  iou_threshold: float = IOU_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [B, C, h, w], thresholds [C], part masks [B, P, sh, sw] -> (hits [C, P]: images showing part p where
    IoU(upsampled map > threshold, part mask) > iou_threshold; present [P]: images showing part p)."""
    up = bilinear_upsample(maps.float(), tuple(masks.shape[-2:]))
    fm = (up > thresholds.view(1, -1, 1, 1)).flatten(2).float()                     # [B, C, S]
    pm = masks.flatten(2).float()                                                  # [B, P, S]
    inter = fm @ pm.transpose(1, 2)                                                # [B, C, P]
    union = fm.sum(2)[:, :, None] + pm.sum(2)[:, None, :] - inter
    iou = inter / union.clamp(min=1)
    present = pm.sum(2) > 0                                                        # [B, P]
    hits = ((iou > iou_threshold) & present[:, None, :]).sum(dim=0)
    return hits, present.sum(dim=0)


def part_interpretability(hits: torch.Tensor, present: torch.Tensor) -> dict[str, torch.Tensor]:
    """hits [C, P], present [P] -> `score` (mean over filters of the best part's share), `per_filter` [C],
    `best_part` [C] (index into the parts)."""
    share = hits.double() / present.clamp(min=1).double()
    best, best_part = share.max(dim=1)
    return {"score": best.mean(), "per_filter": best, "best_part": best_part, "share": share}


# ----- over a probe set ---------------------------------------------------------------------------------------------
@dataclass
class FilterMeasurements:
    """Both metrics of every filter of one layer over a probe set (global over ranks)."""
    instability: dict[str, torch.Tensor]     # location_instability(...)
    parts: dict[str, torch.Tensor]           # part_interpretability(...)
    thresholds: torch.Tensor                 # [C] activation thresholds
    peak_xy: torch.Tensor                    # [N, C, 2] receptive-field centres of every image's peaks
    peak_values: torch.Tensor                # [N, C]

    def metrics(self) -> dict[str, float]:
        return {"location_instability": float(self.instability["score"]),
                "part_interpretability": float(self.parts["score"]),
                "live_filters": float((self.peak_values > 0).any(dim=0).float().mean())}


@torch.no_grad()
def measure_filters(model, layer: str | nn.Module | HookPoint | None, probe, batches: Iterable[dict],
                    top_k: int = TOP_IMAGES, quantile: float = ACTIVATION_QUANTILE, iou_threshold: float = IOU_THRESHOLD,
                    progress: Callable[[Iterable, str], Iterable] | None = None,
                    option: str = "layer") -> FilterMeasurements:
    """Location instability and part interpretability of `layer`'s filters on a probe set with part masks and
    landmarks. probe: the dataset (its `part_concept_ids` and first item); batches: a re-iterable loader of this
    rank's probe items (dicts with image, seg, landmarks), read twice: maps, peaks and landmarks first, then the IoU
    of the thresholded maps with the part masks once the thresholds (over every rank's maps) are known."""
    progress = progress or (lambda it, desc: it)
    point = layer if isinstance(layer, HookPoint) else resolve_one(model, layer, option)
    device = model_device(model)
    part_ids = torch.as_tensor(list(probe.part_concept_ids), dtype=torch.long)

    maps, landmarks = [], []
    image_size = tuple(torch.as_tensor(probe[0]["image"]).shape[-2:])
    for batch in progress(batches, "maps"):
        maps.append(layer_maps(model, point, batch["image"].to(device)).float().cpu())
        landmarks.append(batch["landmarks"].float())
        image_size = tuple(batch["image"].shape[-2:])
    if maps:
        maps, landmarks = torch.cat(maps), torch.cat(landmarks)
    else:  # an empty shard (more ranks than images) still joins every collective
        shape = layer_maps(model, point, torch.as_tensor(probe[0]["image"])[None].to(device)).shape[1:]
        maps, landmarks = torch.zeros(0, *shape), torch.zeros(0, len(part_ids), 2)
    values, index = peak_positions(maps)
    xy = receptive_field_centres(index, tuple(maps.shape[-2:]), image_size)
    all_values = D.all_gather_cat(values.to(device)).cpu()
    all_xy = D.all_gather_cat(xy.to(device)).cpu()
    all_landmarks = D.all_gather_cat(landmarks.to(device)).cpu()
    thresholds = activation_thresholds(D.all_gather_cat(maps.to(device)).cpu(), quantile)

    hits = torch.zeros(maps.shape[1], len(part_ids), dtype=torch.long)
    present = torch.zeros(len(part_ids), dtype=torch.long)
    start = 0
    for batch in progress(batches, "part IoU"):
        b = batch["seg"].shape[0]
        h_, p_ = part_iou_hits(maps[start:start + b], thresholds, part_masks(batch["seg"], part_ids), iou_threshold)
        hits, present, start = hits + h_, present + p_, start + b
    hits = D.all_reduce_sum(hits.to(device)).cpu()
    present = D.all_reduce_sum(present.to(device)).cpu()
    return FilterMeasurements(instability=location_instability(all_values, all_xy, all_landmarks, image_size, top_k),
                              parts=part_interpretability(hits, present), thresholds=thresholds, peak_xy=all_xy,
                              peak_values=all_values)


@dataclass
class ICNNMetricsResult(Result):
    """icnn_metrics.json: the layer, the three scalars (interp/icnn/...), per filter its location instability (None
    where undefined), part interpretability, best part, threshold and assigned class (None where the layer's filters
    have no templates), and the settings."""

    schema = "icnn_metrics"
    schema_version = 1

    epoch: int
    layer: str
    metrics: dict[str, float]
    filters: list[dict[str, Any]]
    top_k: int
    quantile: float
    iou_threshold: float

    @classmethod
    def build(cls, epoch: int, layer: str, m: FilterMeasurements, part_names: Sequence[str] | None = None,
              filter_class: Sequence[int] | None = None, top_k: int = TOP_IMAGES,
              quantile: float = ACTIVATION_QUANTILE, iou_threshold: float = IOU_THRESHOLD) -> "ICNNMetricsResult":
        parts, inst = m.parts, m.instability
        names = list(part_names or [str(i) for i in range(parts["share"].shape[1])])
        filters = []
        for f in range(parts["per_filter"].shape[0]):
            pf = float(inst["per_filter"][f])
            filters.append({"filter": f, "location_instability": None if math.isnan(pf) else pf,
                            "part_interpretability": float(parts["per_filter"][f]),
                            "best_part": names[int(parts["best_part"][f])],
                            "threshold": float(m.thresholds[f]),
                            "class": None if filter_class is None else int(filter_class[f])})
        return cls(epoch=int(epoch), layer=str(layer), metrics=m.metrics(), filters=filters, top_k=int(top_k),
                   quantile=float(quantile), iou_threshold=float(iou_threshold))

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "layer": self.layer, "metrics": dict(self.metrics), "filters": self.filters,
                "top_k": self.top_k, "quantile": self.quantile, "iou_threshold": self.iou_threshold}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "ICNNMetricsResult":
        return cls(epoch=int(data["epoch"]), layer=str(data["layer"]), metrics=dict(data["metrics"]),
                   filters=list(data["filters"]), top_k=int(data["top_k"]), quantile=float(data["quantile"]),
                   iou_threshold=float(data["iou_threshold"]))
