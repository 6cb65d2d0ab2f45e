"""Concept composability: a class decision read as a sum of concept-labelled unit contributions (the lecture's
experiment on the dynamic connection layer, Sun et al. ICCV 2019), with Interpretable Basis Decomposition of the
class weight vectors as a second view (algorithms/ibd.py). Plain code (no Lightning); callbacks/composability.py
schedules it.

Applies to models whose decision is a sum over units: `core.protocol.UnitHead`, i.e. `unit_contributions(x) ->
(activations [B, D], class weights [K, D])` (cnn with a linear head, dynconn; protopnet through prototypes x last
layer). Unit j's evidence for class c on an image is s_cj = x_j W_cj. The routed evidence is the part the decision
uses: `routed_mask(a)` (bool [B, K, D], from the unit activations a) when the model is a `RoutedUnitHead`
(dynconn's top-K connections), else every unit.

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

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from algorithms.composition_result import (UNINTERPRETABLE, ClassBasis, ClassComposition,  # noqa: F401 (re-exported)
                                           CompositionResult)
from algorithms.dissection_result import DissectionResult
from algorithms.ibd import decompose
from algorithms.probe_sets import base_dataset
from core import distributed as D
from core.errors import CapabilityError
from core.probe import model_device, scores_fn
from core.protocol import RoutedUnitHead, UnitHead, describe_missing


def routed_evidence(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, units=None):
    """(evidence s [B, D] for the predicted class, routed mask [B, D], predicted class [B], weights [K, D]).

    bias: the head's image-independent b [K] (`head_bias`); with it the class scores are the routed evidence plus b
    and the batch costs one pass through the network (without it, class_scores runs as well). units: the output of
    `unit_contributions(x)` when already computed (the epoch's shared probe pass, algorithms/probe_pass.py)."""
    acts, weights = units if units is not None else module.unit_contributions(x)
    mask = module.routed_mask(acts) if isinstance(module, RoutedUnitHead) else None
    if bias is None:
        scores = scores_fn(module)(x)
    elif mask is None:
        scores = acts @ weights.t() + bias
    else:
        scores = (acts[:, None, :] * weights[None] * mask).sum(-1) + bias
    pred = scores.argmax(dim=1)
    s = acts * weights[pred]
    routed = mask[torch.arange(len(pred), device=x.device), pred] if mask is not None else torch.ones_like(
        s, dtype=torch.bool)
    return s, routed, pred, weights


def head_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The bias b [K] of a sum-over-units head: class_scores minus the routed evidence, from the first image of x
    (image-independent by the UnitHead contract)."""
    x = x[:1]
    acts, weights = module.unit_contributions(x)
    votes = acts[:, None, :] * weights[None]
    if isinstance(module, RoutedUnitHead):
        votes = votes * module.routed_mask(acts)
    return (scores_fn(module)(x) - votes.sum(-1))[0]


def units_for_share(abs_evidence: torch.Tensor, share: float = 0.9) -> torch.Tensor:
    """Per row: the fewest units whose evidence reaches `share` of the row's total (0 for an all-zero row)."""
    sorted_ev = abs_evidence.sort(dim=1, descending=True).values
    total = sorted_ev.sum(dim=1, keepdim=True)
    reached = sorted_ev.cumsum(dim=1) >= share * total * (1 - 1e-9)
    count = reached.float().argmax(dim=1) + 1
    return torch.where(total[:, 0] > 0, count, torch.zeros_like(count))


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


def reference_image(loader) -> torch.Tensor | None:
    """The first item of the probe set under the loader's (possibly empty) shard: every rank can read it."""
    base = base_dataset(getattr(loader, "dataset", None))
    try:
        return base[0]["image"]
    except (TypeError, IndexError, KeyError):
        return None


@torch.no_grad()
def compose(module: nn.Module, loader, dissection: DissectionResult, class_names: Sequence[str] | None = None,
            class_concepts: dict[int, Sequence[int]] | None = None, min_share: float = 0.1,
            evidence_share: float = 0.9, ibd_terms: int = 5, device=None,
            reference: torch.Tensor | None = None, option: str = "layer") -> CompositionResult:
    """Composability of `module`'s decisions over the probe batches of `loader` (this rank's shard under DDP; all
    statistics are sums, all-reduced, so every rank returns the same result). `dissection` labels the units of the
    model's unit layer. `reference`: one probe image [C, H, W] that tells the head's shape on a rank whose shard is
    empty (default: the first item of the loader's probe set)."""
    if not isinstance(module, UnitHead):
        raise CapabilityError(describe_missing(module, UnitHead))
    device = device or model_device(module)
    unit_concepts = dissection.unit_concepts()
    names = dissection.concept_names
    interp = unit_concepts.to(device) > 0
    sums = None
    class_sum = class_count = None
    weights = None
    error = None
    bias = None
    try:
        for batch in loader:
            x = batch["image"].to(device)
            if bias is None:
                bias = head_bias(module, x)
            s, routed, pred, weights = routed_evidence(module, x, bias, batch.get("units"))
            if s.shape[1] != dissection.num_units:
                raise ValueError(f"the model has {s.shape[1]} units in unit_contributions but layer "
                                 f"{dissection.layer!r} has {dissection.num_units}; set {option} to the layer "
                                 f"whose channels are those units")
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
        if weights is None:
            # an empty shard still takes part in the reduction: the head's shape from one probe item
            x0 = reference if reference is not None else reference_image(loader)
            if x0 is None:
                raise ValueError("compose: an empty loader needs `reference` (one probe image) for the head's shape")
            weights = module.unit_contributions(x0[None].to(device))[1]
    except Exception as err:  # noqa: BLE001 - raised on every rank together
        error = err
    D.raise_together(error, device)
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
            ibd.append(ClassBasis(class_names[c], dec.statement(names, class_names[c]),
                                  [names[i] for i in dec.concepts], dec.coefficients, dec.shares, dec.residual,
                                  dec.residual_energy))
        metrics["ibd_residual"] = sum(residuals) / len(residuals)
    return CompositionResult(comps, metrics, ibd, layer=dissection.layer)
