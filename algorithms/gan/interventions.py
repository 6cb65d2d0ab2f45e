"""Unit interventions (GAN Dissection, Bau et al. 2019, Sec. 3.2): set the units U of a generator layer to 0
(ablation) or to a constant k (insertion), at all pixels or in a region P, and measure the concept's pixel share on
the generated images. Average causal effect of U on concept c:
ACE = E_z[ s_c(G with r_U := k) ] - E_z[ s_c(G with r_U := 0) ].
Each measurement is compared with the same number of random units (several draws), which is what makes a drop a
finding about the chosen units rather than about removing units at all.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from algorithms.dissection_result import DissectionResult
from algorithms.gan.dissection import units_for
from algorithms.gan.result import ConceptIntervention, InterventionResult
from algorithms.gan.sampling import (agreed_shape, check_generator, concept_masks, generate_with, on_every_rank,
                                     segmenter_of, shard_latents)
from core import distributed as D
from core.errors import ConfigError
from core.probe import interpretation_mode, model_device


def unit_edit(units: torch.Tensor, value: torch.Tensor | float, region: torch.Tensor | None = None):
    """An edit for `generate_with`: r_U := value (a scalar or one value per unit) where `region` (bool [h, w] or
    [B, h, w] at the layer's resolution; None = everywhere)."""
    def edit(r: torch.Tensor) -> torch.Tensor:
        idx = units.to(r.device)
        v = torch.as_tensor(value, dtype=r.dtype, device=r.device).reshape(1, -1, 1, 1)
        new = v.expand(r.shape[0], len(idx), *r.shape[2:])
        if region is not None:
            where = region.to(r.device).bool()
            where = where[None, None] if where.dim() == 2 else where[:, None]
            new = torch.where(where, new, r[:, idx])
        out = r.clone()
        out[:, idx] = new
        return out
    return edit


def _masks(model, layer, segmenter, z, batch_size, edit=None) -> torch.Tensor | None:
    """Concept masks of G(z) (with an edit) [N, C+1, H, W], batched; None for no latents (an empty DDP share)."""
    out = []
    for s in range(0, len(z), batch_size):
        images, _ = generate_with(model, layer, z[s:s + batch_size], edit)
        out.append(concept_masks(segmenter, images))
    return torch.cat(out) if out else None


def region_mask(size: tuple[int, int], box: Sequence[float] | None) -> torch.Tensor | None:
    """bool [h, w] of a box (top, left, bottom, right) in fractions of the map; None = everywhere."""
    if box is None:
        return None
    h, w = size
    t, l, b, r = box
    if not (0 <= t < b <= 1 and 0 <= l < r <= 1):
        raise ConfigError(f"region={list(box)}: use [top, left, bottom, right] fractions with 0 <= top < bottom <= 1 "
                          f"and 0 <= left < right <= 1, or null for all pixels")
    m = torch.zeros(h, w, dtype=torch.bool)
    m[int(t * h):max(int(t * h) + 1, round(b * h)), int(l * w):max(int(l * w) + 1, round(r * w))] = True
    return m


def intervene(model, dissection: DissectionResult, concepts: Sequence[int], num_units: int = 20,
              num_samples: int = 64, seed: int = 1, random_draws: int = 3, insert_scale: float = 1.0,
              region: Sequence[float] | None = None, batch_size: int = 64) -> InterventionResult:
    """For each concept: ablate and insert its top `num_units` units by IoU (and `random_draws` sets of as many
    random units) on `num_samples` latents. Insertion sets a unit to `insert_scale` x its dissection threshold (a
    high quantile of its activations, the paper's k). `region`: [top, left, bottom, right] fractions of the map
    where units are set (None: all pixels); shares are measured in that region of the image. Under DDP each rank
    edits its share of the latents and the pixel counts are all-reduced (the same result on every rank; call it on
    every rank)."""
    check_generator(model)
    segmenter = segmenter_of(model)
    layer = dissection.layer
    u = dissection.num_units
    n = min(int(num_units), u)
    g = torch.Generator().manual_seed(int(seed))
    area = region_mask(dissection.map_size, region)
    device = model_device(model)
    concepts = [int(c) for c in concepts]
    # the units of every measurement: the top units, then the random draws (one generator, the same on every rank)
    unit_sets = [[units_for(dissection, c, n)] + [torch.randperm(u, generator=g)[:n] for _ in range(random_draws)]
                 for c in concepts]
    with interpretation_mode(model, grad=False):
        z, _ = shard_latents(model, num_samples, seed)
        counts, size = on_every_rank(device, _local_counts, model, dissection, segmenter, z, concepts, unit_sets,
                                     insert_scale, area, batch_size)
        size = agreed_shape(size, 2, device)
        counts = D.all_reduce_sum(counts.to(device)).cpu()
    pixels = float(_pixels(area, size).sum()) * int(num_samples)        # |P| summed over all samples
    rows = []
    for c, sets, row in zip(concepts, unit_sets, counts):
        per = row[1:].view(-1, 4)                                # [1 + draws, (ablated, inserted, new, absent)]
        ablated, inserted = (per[:, 0] / pixels).tolist(), (per[:, 1] / pixels).tolist()
        new = (per[:, 2] / per[:, 3].clamp_min(1)).tolist()
        top = sets[0]
        rows.append(ConceptIntervention(
            concept=c, name=dissection.concept_names[c], units=top.tolist(), iou=dissection.iou[top, c].tolist(),
            base_share=float(row[0] / pixels), ablated_share=ablated[0], inserted_share=inserted[0],
            inserted_new_share=new[0], random_ablated_share=ablated[1:], random_inserted_share=inserted[1:],
            random_inserted_new_share=new[1:]))
    return InterventionResult(layer=layer, num_units=n, num_samples=int(num_samples), seed=int(seed),
                              insert_scale=float(insert_scale), region=None if region is None else list(region),
                              concepts=rows)


def _local_counts(model, dissection, segmenter, z, concepts, unit_sets, insert_scale, area, batch_size):
    """This rank's pixel counts [concepts, 1 + 4 x unit sets] (float64): per concept the pixels in P of the
    unedited samples that show it, then per unit set the pixels in P that show it ablated / inserted, the pixels in
    P where it was absent and shows after insertion, and those where it was absent; and the image size (zeros and
    None without latents)."""
    counts = torch.zeros(len(concepts), 1 + 4 * len(unit_sets[0]) if unit_sets else 1, dtype=torch.float64)
    base = _masks(model, dissection.layer, segmenter, z, batch_size)
    if base is None:
        return counts, None
    pix = _pixels(area, base.shape[-2:]).to(base.device)
    for row, (c, sets) in enumerate(zip(concepts, unit_sets)):
        absent = ~base[:, c] & pix
        counts[row, 0] = float((base[:, c] & pix).sum())
        for i, units in enumerate(sets):
            k = dissection.thresholds[units] * insert_scale
            ablated = _masks(model, dissection.layer, segmenter, z, batch_size, unit_edit(units, 0.0, area))
            inserted = _masks(model, dissection.layer, segmenter, z, batch_size, unit_edit(units, k, area))
            counts[row, 1 + 4 * i:5 + 4 * i] = torch.stack([
                (ablated[:, c] & pix).sum(), (inserted[:, c] & pix).sum(), (inserted[:, c] & absent).sum(),
                absent.sum()]).double().cpu()
    return counts, tuple(base.shape[-2:])


def _pixels(area: torch.Tensor | None, size) -> torch.Tensor:
    """The region P at the image size (bool [H, W]; all pixels without a region)."""
    if area is None:
        return torch.ones(tuple(size), dtype=torch.bool)
    return F.interpolate(area[None, None].float(), size=tuple(size), mode="nearest")[0, 0].bool()
