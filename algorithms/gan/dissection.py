"""GAN Dissection (Bau et al., ICLR 2019, Sec. 3.1): per unit u of a generator layer r = h(z), the IoU of its
upsampled, thresholded map with each concept c that the segmenter labels on the generated image,
IoU_{u,c} = E_z |(r_u^up > t) AND s_c(x)| / E_z |(r_u^up > t) OR s_c(x)|.

Thresholds: `quantile` = the top-quantile rule of network dissection (the exact per-unit quantile and the IoU
counts are algorithms/dissection_stats.py, shared with classifier dissection); `iqr` = the paper's rule, the t of
the unit's best concept that maximises the information quality ratio I(r>t; s_c) / H(r>t, s_c) over candidate top
quantiles. The result is a `DissectionResult` (algorithms/dissection_result.py), so labels, tables, summaries and
compare.py work as for a classifier; `top_images` index the probe latents (`latents(model, num_samples, seed)`).
Under DDP the probe latents are sharded over the ranks and the statistics reduced exactly, as for a classifier.
"""
from __future__ import annotations

from typing import Sequence

import torch

from algorithms.dissection_result import DissectionResult
from algorithms.dissection_stats import (IOU_THRESHOLD, gathered_quantiles, gathered_top, iou_statistics,
                                         reduce_sums, threshold_rank)
from algorithms.gan.sampling import (agreed_shape, check_generator, concept_masks, generate_with, on_every_rank,
                                     segmenter_of, shard_latents)
from core.errors import ConfigError
from core.probe import interpretation_mode, model_device, resolve_one

METHODS = ("quantile", "iqr")
#: the netdissect code's GAN setting (top 1% per unit; classifier dissection uses 0.5%)
GAN_QUANTILE = 0.01
#: candidate top quantiles of the `iqr` rule
IQR_QUANTILES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def label_maps(masks: torch.Tensor) -> torch.Tensor:
    """bool masks [B, C+1, H, W] -> Broden label maps [B, L, H, W] (the format iou_statistics reads): at each pixel
    the ids of the concepts present there, largest first, 0-padded; L = the most concepts any pixel carries (a
    handful, not C+1, which keeps iou_statistics' per-pixel work and memory small)."""
    ids = torch.arange(masks.shape[1], device=masks.device, dtype=torch.int16).view(1, -1, 1, 1)
    depth = max(int(masks.sum(1).max()), 1)
    return (masks.to(torch.int16) * ids).topk(depth, dim=1).values


def information_quality_ratio(inter: torch.Tensor, unit_area: torch.Tensor, concept_area: torch.Tensor,
                              total: float) -> torch.Tensor:
    """I(A;B) / H(A,B) of the binary unit mask A and concept mask B from pixel counts: inter [.., U, C+1], unit_area
    [.., U], concept_area [C+1] over `total` pixels (0 log 0 = 0)."""
    n11 = inter
    n10 = unit_area[..., None] - inter
    n01 = concept_area - inter
    n00 = total - n11 - n10 - n01
    joint = torch.stack([n11, n10, n01, n00]).double().clamp_min(0) / total

    def plogp(p):
        return torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))

    h_joint = -plogp(joint).sum(0)
    pa = (unit_area[..., None] / total).double().expand_as(h_joint)
    pb = (concept_area / total).double().expand_as(h_joint)
    h_a = -(plogp(pa) + plogp(1 - pa))
    h_b = -(plogp(pb) + plogp(1 - pb))
    mutual = h_a + h_b - h_joint
    return torch.where(h_joint > 0, mutual / h_joint.clamp_min(1e-300), torch.zeros_like(h_joint))


def _counts(acts, thresholds, labels, num_concepts, batch_size):
    """This rank's IoU counts (intersection [U, C+1], unit area [U], concept area [C+1]); zeros for no samples."""
    dev = thresholds.device
    inter = torch.zeros(len(thresholds), num_concepts + 1, dtype=torch.float64, device=dev)
    unit_area = torch.zeros(len(thresholds), dtype=torch.float64, device=dev)
    concept_area = torch.zeros(num_concepts + 1, dtype=torch.float64, device=dev)
    for s in range(0, len(acts), batch_size):
        i, u, c = iou_statistics(acts[s:s + batch_size], thresholds, labels[s:s + batch_size], None, num_concepts)
        inter, unit_area, concept_area = inter + i, unit_area + u, concept_area + c
    return inter, unit_area, concept_area


def _generate_share(model, layer, segmenter, z, batch_size, option):
    """This rank's layer maps [n, U, h, w] and label maps [n, L, H, W] of its latents (None, None for none)."""
    acts, masks = [], []
    for s in range(0, len(z), batch_size):
        images, r = generate_with(model, layer, z[s:s + batch_size], option=option)
        acts.append(r.float())
        masks.append(concept_masks(segmenter, images))
    return (torch.cat(acts), label_maps(torch.cat(masks))) if acts else (None, None)


def dissect_generator(model, layer: str, num_samples: int = 256, batch_size: int = 64, seed: int = 0,
                      method: str = "quantile", quantile: float = GAN_QUANTILE,
                      candidates: Sequence[float] = IQR_QUANTILES, num_top: int = 8,
                      option: str = "layer") -> DissectionResult:
    """Dissect `layer` of a `GenerativeModel` on `num_samples` latents drawn with `seed`; concepts come from the
    model's `concept_segmenter`. Under DDP each rank generates and segments its contiguous share of those latents;
    the thresholds come from the gathered per-unit top-k and the counts are all-reduced, so every rank returns the
    single-process result. Call it on every rank."""
    check_generator(model)
    if method not in METHODS:
        raise ConfigError(f"{option.rsplit('.', 1)[0]}.threshold={method!r}: use one of {', '.join(METHODS)}")
    segmenter = segmenter_of(model)
    resolve_one(model, layer, option)          # a bad name fails on every rank alike, also on one without samples
    names = list(segmenter.concept_names)
    c = len(names) - 1
    device = model_device(model)
    qs = [quantile] if method == "quantile" else list(candidates)
    with interpretation_mode(model, grad=False):
        z, first = shard_latents(model, num_samples, seed)
        acts, labels = on_every_rank(device, _generate_share, model, layer, segmenter, z, batch_size, option)
        local = None if acts is None else (*acts.shape[1:], *labels.shape[-2:])
        u, h, w, sh, sw = agreed_shape(local, 5, device)
        if acts is None:
            acts = torch.zeros(0, u, h, w, device=device)
            labels = torch.zeros(0, 1, sh, sw, dtype=torch.int16, device=device)
        n, total = int(num_samples), int(num_samples) * h * w
        # each rank's k largest values per unit (k of the largest candidate quantile) -> exact global thresholds
        k = max(threshold_rank(total, q)[3] for q in qs)
        flat = acts.transpose(0, 1).reshape(u, -1)
        cand = gathered_quantiles(flat.topk(min(k, flat.shape[1]), dim=1).values, total, qs)         # [Q, U]
        stats = [_counts(acts, t, labels, c, batch_size) for t in cand]
        inter, unit_area, concept_area = reduce_sums(torch.stack([s[0] for s in stats]),
                                                     torch.stack([s[1] for s in stats]), stats[0][2])
        if method == "quantile":
            best_q = torch.zeros(u, dtype=torch.long, device=device)
        else:
            iqr = information_quality_ratio(inter, unit_area, concept_area, float(n * sh * sw))
            iqr[..., 0] = 0
            best_q = iqr.amax(dim=2).argmax(dim=0)                                                   # [U]
        units = torch.arange(u, device=device)
        thresholds, inter, unit_area = cand[best_q, units], inter[best_q, units], unit_area[best_q, units]
        peak = acts.amax(dim=(2, 3)).T                                                               # [U, n_local]
        scores, j = peak.topk(min(num_top, peak.shape[1]), dim=1)
        top_scores, top_images = gathered_top(scores, j + first, num_top, n)
    cats = list(getattr(segmenter, "concept_categories", [""] * len(names)))
    return DissectionResult(
        layer=layer, thresholds=thresholds.cpu(), intersection=inter.cpu(), unit_area=unit_area.cpu(),
        concept_area=concept_area.cpu(), concept_names=names, concept_categories=cats,
        category_names=sorted({x for x in cats if x}), num_images=n, map_size=(h, w), seg_size=(sh, sw),
        top_images=top_images.cpu(), top_scores=top_scores.cpu(), iou_threshold=IOU_THRESHOLD, quantile=quantile,
        extra={"source": "gan", "threshold": method, "seed": int(seed), "num_samples": int(num_samples)})


def units_for(result: DissectionResult, concept: int, n: int) -> torch.Tensor:
    """The n units with the highest IoU for `concept` (GAN Dissection's ranking of units for an intervention)."""
    return result.iou[:, concept].topk(min(n, result.num_units)).indices
