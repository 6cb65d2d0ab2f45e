"""Concept composability: a class decision read as a sum of concept-labelled unit contributions (the lecture's
experiment on the dynamic connection layer, Sun et al. ICCV 2019), with Interpretable Basis Decomposition of the
class weight vectors as a second view (callbacks/ibd.py).

Applies to models whose decision is a sum over units, i.e. that implement `unit_contributions(x) -> (activations
[B, D], class weights [K, D])` (cnn with a linear head, dynconn, icnn; protopnet through prototypes x last layer).
Unit j's evidence for class c on an image is s_cj = x_j W_cj. The routed evidence is the part the decision uses:
`module.routed_mask(x)` (bool [B, K, D], dynconn's top-K connections) when the model has it, else the K largest
votes when the model has an integer `k`, else every unit.

Measured on the probe set, for each image's predicted class c (per image, then averaged over images):
- completeness = sum_{routed j} s_cj / sum_j |s_cj|   (1 when the routed units carry all evidence and none cancels)
- concept_coverage = sum_{routed, interpretable j} |s_cj| / sum_{routed j} |s_cj|
- sparsity_units90 = the fewest units whose routed |s_cj| reach 90% of sum_{routed j} |s_cj|;
  nonzero_weights_per_class = mean over classes of #{j : |W_cj| > 1e-3 max|W|}
- per class c, over the images predicted as c: mean routed evidence e_j; its positive part split over units,
  units grouped by their dissection concept ("(uninterpretable)" for units below IoU 0.04): the shares sum to 1
  ("red-circle = circle 41% + red 30% + (uninterpretable) 29%"); the negative part is reported as negative_share =
  sum |e_j < 0| / sum |e_j|.
- agreement with the data's ground truth (shapes: class -> its defining concepts): the class's concepts are those
  with share >= min_share; precision = |concepts & defining| / |concepts| (0 when there are none), recall =
  |concepts & defining| / |defining|, averaged over classes with at least one image.
"""
from __future__ import annotations

import csv
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from core import distributed as D
from callbacks.base import InterpretationCallback, write_json
from callbacks.dissection import (DissectionCallback, DissectionResult, agree_on_failure, dissect)
from callbacks.ibd import decompose

log = logging.getLogger(__name__)

UNINTERPRETABLE = "(uninterpretable)"


def routed_evidence(module: nn.Module, x: torch.Tensor):
    """(evidence s [B, D] for the predicted class, routed mask [B, D], predicted class [B], weights [K, D])."""
    acts, weights = module.unit_contributions(x)
    scores = module.class_scores(x) if hasattr(module, "class_scores") else module(x)
    pred = scores.argmax(dim=1)
    s = acts * weights[pred]
    if hasattr(module, "routed_mask"):
        routed = module.routed_mask(x)[torch.arange(len(pred), device=x.device), pred]
    elif isinstance(getattr(module, "k", None), int) and 0 < module.k < acts.shape[1]:
        # Dynamic-K without a routed_mask helper: the K largest votes of the predicted class
        routed = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(module.k, dim=1).indices, True)
    else:
        routed = torch.ones_like(s, dtype=torch.bool)
    return s, routed, pred, weights


def units_for_share(abs_evidence: torch.Tensor, share: float = 0.9) -> torch.Tensor:
    """Per row: the fewest units whose evidence reaches `share` of the row's total (0 for an all-zero row)."""
    sorted_ev = abs_evidence.sort(dim=1, descending=True).values
    total = sorted_ev.sum(dim=1, keepdim=True)
    reached = sorted_ev.cumsum(dim=1) >= share * total * (1 - 1e-9)
    count = reached.float().argmax(dim=1) + 1
    return torch.where(total[:, 0] > 0, count, torch.zeros_like(count))


@dataclass
class ClassComposition:
    name: str
    num_images: int
    concept_shares: "OrderedDict[str, float]"   # positive evidence shares by concept (sum to 1), largest first
    negative_share: float
    top_units: list[tuple[int, str, float]]     # (unit, concept or "(uninterpretable)", share) largest first
    concepts: list[int] = field(default_factory=list)   # concept ids with share >= min_share
    precision: float | None = None
    recall: float | None = None

    def statement(self) -> str:
        terms = " + ".join(f"{c} {100 * s:.0f}%" for c, s in self.concept_shares.items() if s >= 0.005)
        return f"{self.name} = {terms or '(no positive evidence)'}"


@dataclass
class CompositionResult:
    classes: list[ClassComposition]
    metrics: dict[str, float]
    ibd: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics,
                "classes": [{"class": c.name, "num_images": c.num_images, "statement": c.statement(),
                             "concept_shares": c.concept_shares, "negative_share": c.negative_share,
                             "top_units": [{"unit": u + 1, "concept": n, "share": s} for u, n, s in c.top_units],
                             "concepts": c.concepts, "precision": c.precision, "recall": c.recall}
                            for c in self.classes],
                "ibd": self.ibd}


def class_composition(evidence: torch.Tensor, unit_concepts: torch.Tensor, concept_names: Sequence[str],
                      name: str, num_images: int, top_units: int = 5) -> ClassComposition:
    """One class from its mean routed evidence per unit [D] and the units' concept ids [D] (0 = uninterpretable)."""
    pos = evidence.clamp_min(0).double()
    total = float(evidence.abs().sum())
    negative = float((-evidence).clamp_min(0).sum()) / total if total > 0 else 0.0
    shares = OrderedDict()
    if pos.sum() > 0:
        unit_share = pos / pos.sum()
        by_concept = torch.zeros(len(concept_names), dtype=torch.float64).index_add_(0, unit_concepts.long(),
                                                                                    unit_share)
        for c in by_concept.argsort(descending=True).tolist():
            if by_concept[c] > 0:
                shares[concept_names[c] if c else UNINTERPRETABLE] = float(by_concept[c])
        top = unit_share.argsort(descending=True)[:top_units].tolist()
        tops = [(u, concept_names[int(unit_concepts[u])] if int(unit_concepts[u]) else UNINTERPRETABLE,
                 float(unit_share[u])) for u in top if unit_share[u] > 0]
    else:
        tops = []
    return ClassComposition(name, num_images, shares, negative, tops)


def agreement(compositions: list[ClassComposition], concept_names: Sequence[str],
              class_concepts: dict[int, Sequence[int]], min_share: float = 0.1) -> tuple[float, float]:
    """Mean precision and recall of each class's concepts (share >= min_share) against its defining concepts."""
    index = {n: i for i, n in enumerate(concept_names)}
    precisions, recalls = [], []
    for k, comp in enumerate(compositions):
        if comp.num_images == 0 or k not in class_concepts:
            continue
        found = {index[n] for n, s in comp.concept_shares.items() if n != UNINTERPRETABLE and s >= min_share}
        truth = set(int(c) for c in class_concepts[k])
        hit = len(found & truth)
        comp.concepts = sorted(found)
        comp.precision = hit / len(found) if found else 0.0
        comp.recall = hit / len(truth) if truth else 0.0
        precisions.append(comp.precision)
        recalls.append(comp.recall)
    mean = (lambda v: sum(v) / len(v) if v else 0.0)
    return mean(precisions), mean(recalls)


@torch.no_grad()
def compose(module: nn.Module, loader, dissection: DissectionResult, class_names: Sequence[str] | None = None,
            class_concepts: dict[int, Sequence[int]] | None = None, min_share: float = 0.1,
            evidence_share: float = 0.9, ibd_terms: int = 5, device=None) -> CompositionResult:
    """Composability of `module`'s decisions over the probe batches of `loader` (this rank's shard under DDP; all
    statistics are sums, all-reduced, so every rank returns the same result)."""
    device = device or next(module.parameters()).device
    unit_concepts = dissection.unit_concepts()
    names = dissection.concept_names
    interp = unit_concepts.to(device) > 0
    sums = None
    class_sum = class_count = None
    weights = None
    error = None
    try:
        for batch in loader:
            x = batch["image"].to(device)
            s, routed, pred, weights = routed_evidence(module, x)
            if s.shape[1] != dissection.num_units:
                raise ValueError(f"the model has {s.shape[1]} units in unit_contributions but layer "
                                 f"{dissection.layer!r} has {dissection.num_units}; set "
                                 f"callbacks.composability.layer to the layer whose channels are those units")
            r = s * routed
            abs_all = s.abs().sum(1)
            abs_routed = r.abs().sum(1)
            completeness = torch.where(abs_all > 0, r.sum(1) / abs_all.clamp_min(1e-30), torch.zeros_like(abs_all))
            coverage = torch.where(abs_routed > 0, (r.abs() * interp).sum(1) / abs_routed.clamp_min(1e-30),
                                   torch.zeros_like(abs_routed))
            sparsity = units_for_share(r.abs(), evidence_share).to(s.dtype)
            part = torch.stack([completeness.sum(), coverage.sum(), sparsity.sum(),
                                torch.tensor(float(len(x)), device=device)]).double()
            sums = part if sums is None else sums + part
            k = weights.shape[0]
            if class_sum is None:
                class_sum = torch.zeros(k, s.shape[1], dtype=torch.float64, device=device)
                class_count = torch.zeros(k, dtype=torch.float64, device=device)
            class_sum.index_add_(0, pred, r.double())
            class_count += torch.bincount(pred, minlength=k).double()
    except Exception as err:  # noqa: BLE001 - raised on every rank together
        error = err
    agree_on_failure(error, device)
    # ranks with an empty shard still need the shapes: take them from the model's weights
    if weights is None:
        weights = _class_weights(module, device)
    k, d = weights.shape
    if sums is None:
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        class_sum = torch.zeros(k, d, dtype=torch.float64, device=device)
        class_count = torch.zeros(k, dtype=torch.float64, device=device)
    packed = D.all_reduce_sum(torch.cat([sums, class_sum.flatten(), class_count]))
    sums, class_sum, class_count = packed[:4], packed[4:4 + k * d].view(k, d), packed[4 + k * d:]
    n = max(float(sums[3]), 1.0)
    class_names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    comps = []
    for c in range(k):
        count = int(class_count[c])
        mean = class_sum[c] / max(count, 1)
        comps.append(class_composition(mean.cpu(), unit_concepts, names, class_names[c], count))
    w_cpu = weights.detach().double().cpu()
    nonzero = (w_cpu.abs() > 1e-3 * w_cpu.abs().max().clamp_min(1e-30)).sum(1).double().mean()
    metrics = {"completeness": float(sums[0]) / n, "concept_coverage": float(sums[1]) / n,
               "sparsity_units90": float(sums[2]) / n, "nonzero_weights_per_class": float(nonzero)}
    if class_concepts:
        p, r = agreement(comps, names, class_concepts, min_share)
        metrics.update(agreement_precision=p, agreement_recall=r)
    ibd = []
    q = dissection.concept_vectors()
    if q is not None and ibd_terms > 0:
        residuals = []
        for c in range(k):
            dec = decompose(w_cpu[c], q, max_terms=ibd_terms)
            residuals.append(dec.residual)
            ibd.append({"class": class_names[c], "statement": dec.statement(names, class_names[c]),
                        "concepts": [names[i] for i in dec.concepts], "coefficients": dec.coefficients,
                        "shares": dec.shares, "residual": dec.residual, "residual_energy": dec.residual_energy})
        metrics["ibd_residual"] = sum(residuals) / len(residuals)
    return CompositionResult(comps, metrics, ibd)


def _class_weights(module, device):
    head = getattr(module, "head", None)
    w = getattr(head, "weight", None)
    if w is None:
        raise ValueError(f"{type(module).__name__}: cannot tell its class weights without a batch")
    return w.detach().to(device)


def uses_unit_contributions(module) -> bool:
    """True when the model's decision is a sum over units (core.protocol.UnitHead)."""
    from core.protocol import UnitHead
    return isinstance(module, UnitHead)


class ComposabilityCallback(InterpretationCallback):
    """Runs after the dissection callback of the same run (it must come after it in callbacks) and reuses its labels
    for `layer` (default: `module.composability_layer` or the model's default probe layer, whose channels are the
    units of unit_contributions); runs dissection itself when that layer was not dissected this epoch.

    Outputs in <run>/interp/composability/epoch_NNN/: composability.json, composability.csv (one row per class:
    statement, precision, recall, IBD statement and residual); a W&B table; scalars interp/composability/
    {completeness, concept_coverage, sparsity_units90, nonzero_weights_per_class, agreement_precision,
    agreement_recall, ibd_residual}.
    """

    name = "composability"

    def __init__(self, layer: str | None = None, min_share: float = 0.1, evidence_share: float = 0.9,
                 ibd_terms: int = 5, probe: str | None = None, probe_split: str = "val", probe_size: int | None = 300,
                 **kwargs):
        super().__init__(**kwargs)
        self.layer, self.min_share, self.evidence_share, self.ibd_terms = layer, float(min_share), float(
            evidence_share), int(ibd_terms)
        # used only when no dissection callback of the run provides the labels
        self._own = DissectionCallback(layers=layer, probe=probe, probe_split=probe_split, probe_size=probe_size,
                                       gallery_units=0)
        self.result: CompositionResult | None = None

    def applies_to(self, module) -> bool:
        return uses_unit_contributions(module)

    def _layer(self, module) -> str:
        return self.layer or getattr(module, "unit_layer", None) or module.default_probe_layer or next(
            reversed(module.probe_layers()))

    def _dissection(self, trainer, module, epoch, layer):
        for cb in getattr(trainer, "callbacks", []) or []:
            if isinstance(cb, DissectionCallback) and cb is not self._own and cb.results_epoch == epoch \
                    and layer in cb.results:
                return cb.results[layer], cb.probe_dataset(trainer)
        probe, error = None, None
        try:
            probe = self._own.probe_dataset(trainer)
        except Exception as err:  # noqa: BLE001
            error = err
        agree_on_failure(error, module.device)
        if probe is None:
            return None, None
        res = dissect(module, [layer], self.loader(self.shard(probe)), quantile=self._own.quantile,
                      iou_threshold=self._own.iou_threshold, top_n=1)
        return res[layer], probe

    def run(self, trainer, module, epoch):
        layer = self._layer(module)
        dissection, probe = self._dissection(trainer, module, epoch, layer)
        if dissection is None:
            return {}
        # every rank sees the same first probe item, so all take the same branch
        x = probe[0]["image"][None].to(module.device)
        units = module.unit_contributions(x)[0].shape[1]
        if units != dissection.num_units:
            if not getattr(self, "_warned_units", False):
                log.warning("composability skipped: %s has %d units in unit_contributions but layer %r has %d "
                            "channels; set callbacks.composability.layer (or model.composability_layer) to the layer "
                            "whose channels are those units", type(module).__name__, units, layer,
                            dissection.num_units)
                self._warned_units = True
            return {}
        class_concepts = getattr(probe, "class_concepts", None)
        dm = getattr(trainer, "datamodule", None)
        class_names = getattr(dm, "class_names", None)
        result = compose(module, self.loader(self.shard(probe)), dissection, class_names=class_names,
                         class_concepts=class_concepts, min_share=self.min_share,
                         evidence_share=self.evidence_share, ibd_terms=self.ibd_terms)
        self.result = result
        if self.is_rank_zero:
            self.write_outputs(trainer, result, epoch, layer)
        return result.metrics

    def write_outputs(self, trainer, result: CompositionResult, epoch: int, layer: str):
        out = self.epoch_dir(trainer, epoch)
        write_json(out / "composability.json", {"epoch": epoch, "layer": layer, **result.to_json()})
        columns = ["class", "images", "statement", "negative_share", "precision", "recall", "ibd", "ibd_residual"]
        ibd = {d["class"]: d for d in result.ibd}
        rows = []
        for c in result.classes:
            d = ibd.get(c.name, {})
            rows.append([c.name, c.num_images, c.statement(), round(c.negative_share, 4),
                         None if c.precision is None else round(c.precision, 4),
                         None if c.recall is None else round(c.recall, 4), d.get("statement", ""),
                         None if not d else round(d["residual"], 4)])
        with open(out / "composability.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
        self.log_table(trainer, "classes", columns, rows)
