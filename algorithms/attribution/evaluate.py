"""Evaluation of several attribution methods on probe batches: sums over images that add up over batches and ranks
(all-reduce `AttributionTotals.packed()`), turned into means by `AttributionTotals.metrics()`.

    totals = evaluate(model, batches, ["gradcam", "cam"], deletion_methods=["gradcam"], sanity_method="gradcam")
    totals.metrics()     # {"gradcam": {"pointing_game": ..., "energy": ..., "deletion_auc": ..., ...}, "cam": {...}}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from algorithms.attribution.maps import heatmap, upsample
from algorithms.attribution.methods import make_method
from algorithms.attribution.metrics import curve_auc, deletion_curve, energy_in_mask, pointing_game
from algorithms.attribution.sanity import randomize_top_layers, spearman
from algorithms.attribution.targets import explained_classes
from core.probe import model_device, scores_fn

#: columns of AttributionTotals.stats: sums over images
COLUMNS = ("pointing_hits", "masks", "energy", "pointing_hits_strict", "deletion_auc", "deletion_images")


@dataclass
class AttributionTotals:
    """Per method (rows of `stats`, see COLUMNS) sums over images, and for the sanity check (sum of rho, images)."""

    methods: list[str]
    stats: Tensor              # [M, len(COLUMNS)] float64
    sanity: Tensor             # [2] float64
    sanity_method: str | None = None

    def packed(self) -> Tensor:
        """Everything as one float64 vector (one all-reduce sums it over ranks)."""
        return torch.cat([self.stats.flatten(), self.sanity])

    def unpacked(self, packed: Tensor) -> "AttributionTotals":
        n = self.stats.numel()
        return AttributionTotals(self.methods, packed[:n].view_as(self.stats), packed[n:], self.sanity_method)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Means: pointing game and energy over images with a non-empty object mask, deletion AUC over the images
        of the methods that had it, sanity Spearman over all images."""
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.methods):
            s = self.stats[i].tolist()
            m: dict[str, float] = {}
            if s[1] > 0:
                m["pointing_game"] = s[0] / s[1]
                m["pointing_game_strict"] = s[3] / s[1]
                m["energy"] = s[2] / s[1]
            if s[5] > 0:
                m["deletion_auc"] = s[4] / s[5]
            if m:
                out[name] = m
        if self.sanity_method and self.sanity[1] > 0:
            out.setdefault(self.sanity_method, {})["sanity_spearman"] = float(self.sanity[0] / self.sanity[1])
        return out


def evaluate(model: nn.Module, batches: Iterable[dict], methods: Sequence[str], layer=None, *,
             target: str = "true", deletion_methods: Sequence[str] = (), deletion_steps: int = 10,
             pointing_tolerance: float = 0.067, sanity_method: str | None = None, sanity_layers: int = 1,
             sanity_size: int = 32, seed: int = 0, max_batch: int = 64) -> AttributionTotals:
    """Maps of `methods` for every batch ({image, label, optional bool mask [B, H, W]}), explaining the label
    (target="true"; unlabelled images: the prediction) or the prediction ("predicted"):

    - pointing game (hit within `pointing_tolerance` of the mask's side, and strict) and energy inside the mask,
      on images whose mask is not empty;
    - deletion AUC (`deletion_steps` steps, forward chunks of at most `max_batch` images) for `deletion_methods`;
    - Spearman rho between `sanity_method`'s maps of the model and of a copy whose head and top `sanity_layers`
      probe layers are re-initialised (seeded: every rank builds the same copy), on maps resized to `sanity_size`.
    """
    device = model_device(model)
    stats = torch.zeros(len(methods), len(COLUMNS), dtype=torch.float64, device=device)
    sanity = torch.zeros(2, dtype=torch.float64, device=device)
    randomized = randomize_top_layers(model, sanity_layers, seed) if sanity_method else None
    score = scores_fn(model)
    for batch in batches:
        x = batch["image"].to(device).clone()
        t = explained_classes(model, x, batch["label"].to(device), target)
        mask = batch.get("mask")
        mask = mask.to(device) if mask is not None else None
        maps_of = {}
        for i, name in enumerate(methods):
            method = make_method(name, model, layer)
            maps = method.attribute(x, t).detach()
            maps_of[name] = (maps, method.target_)
            heat = heatmap(maps)
            if mask is not None:
                h = upsample(heat[:, None], mask.shape[-2:])[:, 0]
                tol = pointing_tolerance * max(mask.shape[-2:])  # fraction of the side -> mask pixels
                hit, valid = pointing_game(h, mask, tol)
                stats[i, 0] += hit.sum()
                stats[i, 1] += valid.sum()
                stats[i, 2] += energy_in_mask(h, mask)[valid].sum()
                stats[i, 3] += pointing_game(h, mask)[0].sum()
            if name in deletion_methods:
                # chunks of max_batch images: larger forward batches were slower per image on CPU
                auc = curve_auc(deletion_curve(score, x, heat, method.target_, deletion_steps, max_batch=max_batch,
                                               scores=getattr(method, "scores_", None)))
                stats[i, 4] += auc.sum()
                stats[i, 5] += len(x)
        if sanity_method:
            before, explained = maps_of.get(sanity_method) or _maps(sanity_method, model, layer, x, t)
            after = make_method(sanity_method, randomized, layer).attribute(x, explained).detach()
            size = (min(sanity_size, x.shape[-2]), min(sanity_size, x.shape[-1]))
            rho = spearman(upsample(heatmap(before)[:, None], size), upsample(heatmap(after)[:, None], size))
            sanity += torch.stack([rho.double().sum(), torch.tensor(float(len(x)), dtype=torch.float64,
                                                                      device=device)])
    return AttributionTotals(list(methods), stats, sanity, sanity_method)


def _maps(name, model, layer, x, target):
    method = make_method(name, model, layer)
    return method.attribute(x, target).detach(), method.target_
