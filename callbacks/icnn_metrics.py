"""The interpretable CNN's two metrics (Zhang et al., CVPR 2018, Sec. 4.3), computed exactly on a concept data set with
part masks and part landmarks (`shapes`):

- location instability (lower is better): for each filter its top-K images by max activation; the receptive-field
  centre p_hat of the peak; for each part landmark p_k, d = ||p_k - p_hat||; D_f,k = standard deviation of d over
  those images; averaged over landmarks and filters and divided by the image diagonal.
- part interpretability (higher is better, network-dissection style): each filter's map thresholded at its top 0.5%
  activation quantile (over all images and positions), upsampled to the mask size; for every part, the share of
  the images showing that part where the IoU of the thresholded map with the part mask exceeds 0.2; a filter's
  score is that share for its best part; averaged over filters.

The functions at the top take tensors (or a model, a layer and images) and return tensors, usable from a notebook;
`ICNNMetricsCallback` below shards the probe set across ranks, reduces, writes JSON + a PNG and logs
`interp/icnn/location_instability`, `interp/icnn/part_interpretability` and `interp/icnn/live_filters`. It works on
any model's probe layer (`layer=...`), so the `model.interpretable=false` baseline is measured the same way.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from core import distributed as D
from callbacks.base import InterpretationCallback, forward_hooks, write_json

log = logging.getLogger(__name__)

ACTIVATION_QUANTILE = 0.995   # "top 0.5% activation quantile" (network dissection)
IOU_THRESHOLD = 0.2
TOP_IMAGES = 100


# ----- algorithm ------------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_maps(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] output of `layer` when `model` classifies `images` (a forward hook, always removed)."""
    captured = []
    with forward_hooks([layer], lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)):
        model(images)
    if not captured or captured[-1].dim() != 4:
        raise ValueError("the probe layer must output a [B, C, h, w] feature map")
    return captured[-1].detach()


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


# ----- callback -------------------------------------------------------------------------------------------------
class ICNNMetricsCallback(InterpretationCallback):
    """Location instability and part interpretability of a layer's filters on the probe set, every epoch."""

    name = "icnn"

    def __init__(self, layer: str | None = None, all_models: bool = False, split: str = "val",
                 top_k: int = TOP_IMAGES, quantile: float = ACTIVATION_QUANTILE, iou_threshold: float = IOU_THRESHOLD,
                 max_images: int | None = None, figure_filters: int = 8, figure_images: int = 6, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"callbacks.icnn_metrics.quantile={quantile}: must lie in (0, 1), e.g. 0.995")
        if int(top_k) < 2:
            raise ValueError(f"callbacks.icnn_metrics.top_k={top_k}: a standard deviation needs >= 2 images")
        self.layer, self.all_models, self.split = layer, bool(all_models), split
        self.top_k, self.quantile, self.iou_threshold = int(top_k), float(quantile), float(iou_threshold)
        self.max_images = max_images
        self.figure_filters, self.figure_images = int(figure_filters), int(figure_images)
        self._warned = False

    def applies_to(self, module) -> bool:
        from models.icnn import ICNNClassifier
        return self.all_models or isinstance(module, ICNNClassifier)

    def probe_set(self, trainer):
        dm = self.datamodule(trainer)
        ds = dm.probe_dataset(self.split) if hasattr(dm, "probe_dataset") else None
        if ds is None or getattr(ds, "part_concept_ids", None) is None:
            if not self._warned and self.is_rank_zero:
                log.warning("icnn metrics need a probe set with part masks and landmarks (datamodule=shapes); skipped")
            self._warned = True
            return None
        if self.max_images is not None and len(ds) > int(self.max_images):
            ds = _SubsetWithAttributes(ds, range(int(self.max_images)))
        return ds

    def run(self, trainer, module, epoch):
        ds = self.probe_set(trainer)
        if ds is None:
            return {}
        layer, device = module.get_probe_layer(self.layer), module.device
        shard = self.shard(ds)
        part_ids = torch.as_tensor(list(ds.part_concept_ids), dtype=torch.long)

        # pass 1: this rank's maps, peaks and landmarks
        maps, landmarks = [], []
        for batch in self.progress(self.loader(shard), "maps"):
            maps.append(layer_maps(module, layer, batch["image"].to(device)).float().cpu())
            landmarks.append(batch["landmarks"].float())
            image_size = tuple(batch["image"].shape[-2:])
        if maps:
            maps, landmarks = torch.cat(maps), torch.cat(landmarks)
        else:  # an empty shard (more ranks than images) still joins every collective
            c, h, w = self._map_shape(module, layer, ds, device)
            maps, landmarks = torch.zeros(0, c, h, w), torch.zeros(0, len(part_ids), 2)
            image_size = tuple(ds[0]["image"].shape[-2:])
        values, index = peak_positions(maps)
        xy = receptive_field_centres(index, tuple(maps.shape[-2:]), image_size)
        all_values = D.all_gather_cat(values.to(device)).cpu()
        all_xy = D.all_gather_cat(xy.to(device)).cpu()
        all_landmarks = D.all_gather_cat(landmarks.to(device)).cpu()
        thresholds = activation_thresholds(D.all_gather_cat(maps.to(device)).cpu(), self.quantile)

        # pass 2: IoU of the thresholded maps with the exact part masks, summed over ranks
        hits = torch.zeros(maps.shape[1], len(part_ids), dtype=torch.long)
        present = torch.zeros(len(part_ids), dtype=torch.long)
        start = 0
        for batch in self.progress(self.loader(shard), "part IoU"):
            b = batch["seg"].shape[0]
            h_, p_ = part_iou_hits(maps[start:start + b], thresholds, part_masks(batch["seg"], part_ids),
                                   self.iou_threshold)
            hits, present, start = hits + h_, present + p_, start + b
        hits = D.all_reduce_sum(hits.to(device)).cpu()
        present = D.all_reduce_sum(present.to(device)).cpu()

        inst = location_instability(all_values, all_xy, all_landmarks, image_size, self.top_k)
        parts = part_interpretability(hits, present)
        live = (all_values > 0).any(dim=0)
        metrics = {"location_instability": float(inst["score"]), "part_interpretability": float(parts["score"]),
                   "live_filters": float(live.float().mean())}
        if self.is_rank_zero:
            self.write_results(trainer, module, epoch, ds, metrics, inst, parts, thresholds, all_xy)
        return metrics

    @torch.no_grad()
    def _map_shape(self, module, layer, ds, device):
        return tuple(layer_maps(module, layer, ds[0]["image"][None].to(device)).shape[1:])

    # ----- outputs (rank 0) ------------------------------------------------------------------------------------
    def write_results(self, trainer, module, epoch, ds, metrics, inst, parts, thresholds, all_xy):
        out = self.epoch_dir(trainer, epoch)
        part_names = list(getattr(ds, "part_names", None) or [str(i) for i in range(parts["share"].shape[1])])
        filter_class = None
        if hasattr(module, "filter_class") and getattr(module, "interpretable", False):
            filter_class = module.filter_class().cpu().tolist()
        filters = []
        for f in range(parts["per_filter"].shape[0]):
            pf = float(inst["per_filter"][f])
            filters.append({"filter": f, "location_instability": None if math.isnan(pf) else pf,
                            "part_interpretability": float(parts["per_filter"][f]),
                            "best_part": part_names[int(parts["best_part"][f])],
                            "threshold": float(thresholds[f]),
                            "class": None if filter_class is None else filter_class[f]})
        write_json(out / "icnn_metrics.json", {"epoch": epoch, "layer": self.layer or module.default_probe_layer,
                                                "metrics": metrics, "filters": filters,
                                                "top_k": self.top_k, "quantile": self.quantile,
                                                "iou_threshold": self.iou_threshold})
        png = out / "filter_peaks.png"
        render_peak_figure(png, ds, inst["top_index"], inst["top_values"], all_xy, filters,
                           self.figure_filters, self.figure_images)
        self.log_images(trainer, "filter_peaks", [png])
        self.log_table(trainer, "filters", list(filters[0].keys()) if filters else [],
                       [list(r.values()) for r in filters])


def render_peak_figure(path: Path, ds, top_index: torch.Tensor, top_values: torch.Tensor, peak_xy: torch.Tensor,
                       filters: list[dict], num_filters: int, num_images: int) -> None:
    """One row per filter (the first `num_filters` filters that fire): its top images with the receptive-field
    centre of the peak marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = [f for f in range(top_index.shape[0]) if bool(top_values[f, 0] > 0)][:num_filters]
    cols = min(num_images, top_index.shape[1])
    if not live or cols == 0:
        return
    fig, axes = plt.subplots(len(live), cols, figsize=(1.6 * cols, 1.7 * len(live)), squeeze=False)
    for r, f in enumerate(live):
        for c in range(cols):
            ax, i = axes[r][c], int(top_index[f, c])
            ax.imshow(ds[i]["raw"].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray")
            if bool(top_values[f, c] > 0):
                x, y = peak_xy[i, f].tolist()
                ax.scatter([x], [y], s=60, marker="+", c="red", linewidths=2)
            ax.set_xticks([])
            ax.set_yticks([])
        info = filters[f]
        axes[r][0].set_ylabel(f"f{f} {info['best_part']}\n{info['part_interpretability']:.2f}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


class _SubsetWithAttributes(Subset):
    """A Subset that still exposes the probe set's attributes (part_concept_ids, part_names, ...)."""

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
