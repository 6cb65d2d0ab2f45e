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
from algorithms.gan.sampling import check_generator, concept_masks, generate_with, latents, segmenter_of
from core.errors import ConfigError
from core.probe import interpretation_mode


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


def _masks(model, layer, segmenter, z, batch_size, edit=None) -> torch.Tensor:
    """Concept masks of G(z) (with an edit) [N, C+1, H, W], batched."""
    out = []
    for s in range(0, len(z), batch_size):
        images, _ = generate_with(model, layer, z[s:s + batch_size], edit)
        out.append(concept_masks(segmenter, images))
    return torch.cat(out)


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
    where units are set (None: all pixels); shares are measured in that region of the image."""
    check_generator(model)
    segmenter = segmenter_of(model)
    layer = dissection.layer
    u = dissection.num_units
    n = min(int(num_units), u)
    g = torch.Generator().manual_seed(int(seed))
    rows = []
    with interpretation_mode(model, grad=False):
        z = latents(model, num_samples, seed)
        base = _masks(model, layer, segmenter, z, batch_size)
        area = region_mask(dissection.map_size, region)
        pix = (torch.ones(base.shape[-2:], dtype=torch.bool) if area is None else
               F.interpolate(area[None, None].float(), size=base.shape[-2:], mode="nearest")[0, 0].bool())
        pix = pix.to(base.device)
        denom = pix.sum().clamp_min(1)

        def share(masks, c):
            return float((masks[:, c] & pix).sum() / (denom * len(masks)))

        def new_share(masks, c):   # of the pixels in P where c was absent, the share that now shows c
            absent = ~base[:, c] & pix
            return float((masks[:, c] & absent).sum() / absent.sum().clamp_min(1))

        def effects(units, c):
            k = dissection.thresholds[units] * insert_scale
            ablated = _masks(model, layer, segmenter, z, batch_size, unit_edit(units, 0.0, area))
            inserted = _masks(model, layer, segmenter, z, batch_size, unit_edit(units, k, area))
            return share(ablated, c), share(inserted, c), new_share(inserted, c)

        for c in concepts:
            c = int(c)
            top = units_for(dissection, c, n)
            a, i, new = effects(top, c)
            rand = torch.tensor([effects(torch.randperm(u, generator=g)[:n], c) for _ in range(random_draws)])
            rows.append(ConceptIntervention(
                concept=c, name=dissection.concept_names[c], units=top.tolist(),
                iou=dissection.iou[top, c].tolist(), base_share=share(base, c), ablated_share=a, inserted_share=i,
                inserted_new_share=new, random_ablated_share=rand[:, 0].tolist(),
                random_inserted_share=rand[:, 1].tolist(), random_inserted_new_share=rand[:, 2].tolist()))
    return InterventionResult(layer=layer, num_units=n, num_samples=int(num_samples), seed=int(seed),
                              insert_scale=float(insert_scale), region=None if region is None else list(region),
                              concepts=rows)
