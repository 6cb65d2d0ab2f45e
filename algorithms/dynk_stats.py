"""Explanations and sparsity of a sum-over-units decision, the Dynamic-K head's (Sun, Ravi & Singh, ICCV 2019) in
particular, through the protocol only (core/protocol.py `UnitHead` / `RoutedUnitHead`):

- evidence of unit j for class c on an image: s_cj = a_j W_cj from `unit_contributions(x)` (a [B, D], W [K, D]),
  kept only where `routed_mask(a)` routes the connection (a `RoutedUnitHead`; a dense `UnitHead` uses every unit, so
  the dense cnn and dynconn are measured with the same ruler); the bias is what the class score adds on top:
  b_c = class_scores(x)_c - sum_j s_cj.
- `explain_decisions(model, images)`: per image, the routed units of the predicted class with their contributions
  s_j and shares s_j / sum_j |s_j| ("computer room = screen 41% + office 31% + office 28%").
- `units_for_evidence(evidence, fraction)`: how many units it takes to reach `fraction` of sum_j |s_j|.
- `weight_sparsity(weight)`: non-zero weights per class.
- `head_parameters` + `evidence_sums(...)` + `DynKStats.build(...)`: the statistics over a data set
  (dynconn.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from core.probe import scores_fn
from core.protocol import RoutedUnitHead
from core.results import Result

#: |w| below this fraction of the class's largest |w| counts as zero (weight decay shrinks unrouted weights towards
#: 0 but never to exactly 0)
ZERO_TOLERANCE = 1e-2
#: units an explanation lists for a dense head (a routed head lists its routed units)
DENSE_TOP = 5


def unit_evidence(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(evidence s [N, K, D] actually used: a_j W_cj where routed, 0 elsewhere; routed mask [N, K, D], or None for
    a dense head, which routes every connection)."""
    acts, weight = model.unit_contributions(images)
    evidence = acts[:, None, :] * weight[None]
    mask = None
    if isinstance(model, RoutedUnitHead):
        mask = model.routed_mask(acts)
        evidence = torch.where(mask, evidence, torch.zeros((), dtype=evidence.dtype, device=evidence.device))
    return evidence, mask


def routed_evidence(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(evidence s [N, K, D] as `unit_evidence`, class scores [N, K], routed mask [N, K, D] or None)."""
    evidence, mask = unit_evidence(model, images)
    return evidence, scores_fn(model)(images), mask


def predicted_evidence(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(evidence [N, D] of each image's predicted class, predicted classes [N], class scores [N, K]).

    For a Dynamic-K head the evidence is the routed one (a_j W_cj on the top-K units, 0 elsewhere); for a dense
    head every unit's a_j W_cj."""
    evidence, scores, _ = routed_evidence(model, images)
    pred = scores.argmax(1)
    return evidence[torch.arange(len(pred), device=pred.device), pred], pred, scores


def units_for_evidence(evidence: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    """Smallest number of units whose |s_j| reach `fraction` of sum_j |s_j|, per row of evidence [N, D] -> [N]."""
    mass = evidence.abs().sort(dim=1, descending=True).values
    cum = mass.cumsum(1)
    total = cum[:, -1:]
    reached = cum >= fraction * total - 1e-12 * total.clamp_min(1.0)
    return reached.float().argmax(1) + 1


def weight_sparsity(weight: torch.Tensor, tolerance: float = ZERO_TOLERANCE) -> torch.Tensor:
    """Non-zero weights per class [K]: |w_cj| > tolerance * max_j |w_cj|."""
    w = weight.detach().abs()
    return (w > tolerance * w.amax(1, keepdim=True)).sum(1)


@torch.no_grad()
def explain_decisions(model, images: torch.Tensor, top: int | None = None, unit_names=None) -> list[dict]:
    """Per image: predicted class, its score, bias, and the `top` (default: the routed units of the predicted class
    for a routed head, 5 otherwise) units with their contributions s_j and shares s_j / sum_j |s_j|. For Dynamic-K
    the contributions of the routed units sum to score - bias."""
    evidence, scores, mask = routed_evidence(model, images)
    pred = scores.argmax(1)
    rows = torch.arange(len(pred), device=pred.device)
    evidence = evidence[rows, pred]
    if top is None:
        top = int(mask[rows, pred].sum(-1).max()) if mask is not None and len(pred) else DENSE_TOP
    k = max(1, min(top, evidence.shape[1]))
    total = evidence.abs().sum(1, keepdim=True).clamp_min(1e-12)
    top_idx = evidence.abs().topk(k, dim=1).indices
    contrib = evidence.gather(1, top_idx)
    shares = contrib / total
    score = scores[rows, pred]
    bias = score - evidence.sum(1)
    out = []
    for n in range(images.shape[0]):
        units = top_idx[n].tolist()
        out.append({"predicted": int(pred[n]), "score": float(score[n]), "bias": float(bias[n]),
                    "evidence": float(evidence[n].sum()), "units": units,
                    "unit_names": [unit_names[u] for u in units] if unit_names else None,
                    "contributions": contrib[n].tolist(), "shares": shares[n].tolist()})
    return out


@torch.no_grad()
def head_parameters(model, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's class weights W [K, D] and bias b [K] = class_scores - sum_j s_j (image-independent by the UnitHead
    contract), from one image [C, H, W]."""
    evidence, scores, _ = routed_evidence(model, image[None])
    weight = model.unit_contributions(image[None])[1].detach()
    return weight, (scores - evidence.sum(-1))[0]


@dataclass
class EvidenceSums:
    """Sums over images (float64, on the model's device), to be added up over ranks: units needed per predicted
    class, images per predicted class, the top unit's share of the evidence, the most units routed to a class."""
    units: torch.Tensor    # [K]
    count: torch.Tensor    # [K]
    top1: torch.Tensor     # []
    routed_max: torch.Tensor  # [] (max over ranks, not sum)


@torch.no_grad()
def evidence_sums(model, batches: Iterable[torch.Tensor], bias: torch.Tensor, fraction: float = 0.9,
                  device: torch.device | str = "cpu") -> EvidenceSums:
    """Per predicted class, the units needed for `fraction` of the evidence, summed over the images of `batches`.

    bias: the head's b [K] (`head_parameters`); it does not depend on the image, so the scores are sum_j s_cj + b_c
    and the class scores need no forward pass of their own (the decisions are those of class_scores up to the order
    of a float sum)."""
    num_classes = bias.shape[0]
    sums = EvidenceSums(torch.zeros(num_classes, device=device, dtype=torch.float64),
                        torch.zeros(num_classes, device=device, dtype=torch.float64),
                        torch.zeros((), device=device, dtype=torch.float64),
                        torch.zeros((), device=device, dtype=torch.float64))
    bias = bias.to(device)
    for x in batches:
        evidence, mask = unit_evidence(model, x.to(device))
        pred = (evidence.sum(-1) + bias).argmax(1)
        rows = torch.arange(len(pred), device=pred.device)
        evidence = evidence[rows, pred]
        n_units = units_for_evidence(evidence, fraction).double()
        sums.units.index_add_(0, pred, n_units)
        sums.count.index_add_(0, pred, torch.ones_like(n_units))
        share = evidence.abs().amax(1) / evidence.abs().sum(1).clamp_min(1e-12)
        sums.top1 += share.double().sum()
        routed = mask.sum(-1).amax() if mask is not None else torch.tensor(evidence.shape[1], device=device)
        sums.routed_max = torch.maximum(sums.routed_max, routed.double())
    return sums


@dataclass
class DynKStats(Result):
    """dynconn.json: the decision sparsity of a unit head on a data set (units for `fraction` of the predicted
    class's evidence, the top unit's share, non-zero weights per class), per class, and example explanations."""

    schema = "dynk_stats"
    schema_version = 1

    epoch: int
    k: int | None              # the most units routed to one class of one image (Dynamic-K: K)
    fraction: float
    metrics: dict[str, float]
    zero_tolerance: float
    per_class: list[dict[str, Any]]
    examples: list[dict[str, Any]]

    @classmethod
    def build(cls, epoch: int, sums: EvidenceSums, weight: torch.Tensor, fraction: float,
              class_names: Sequence[str] | None = None, examples: list[dict] | None = None,
              tolerance: float = ZERO_TOLERANCE) -> "DynKStats":
        nonzero = weight_sparsity(weight, tolerance).double().cpu()
        units, count = sums.units.cpu(), sums.count.cpu()
        images = count.sum().clamp_min(1)
        pct = int(round(fraction * 100))
        metrics = {f"units_for_{pct}pct": float(units.sum() / images),
                   "routed_share_top1": float(sums.top1.cpu() / images),
                   "nonzero_weights_per_class": float(nonzero.mean()),
                   "nonzero_weights_fraction": float(nonzero.mean() / weight.shape[1])}
        per_class_units = (units / count.clamp_min(1)).tolist()
        names = list(class_names or [str(c) for c in range(len(count))])
        per_class = [{"class": names[c], "nonzero_weights": int(nonzero[c]), f"units_for_{pct}pct": per_class_units[c],
                      "predicted_images": int(count[c])} for c in range(len(count))]
        routed = int(sums.routed_max) if float(sums.routed_max) > 0 else None
        return cls(epoch=int(epoch), k=routed, fraction=float(fraction), metrics=metrics, zero_tolerance=tolerance,
                   per_class=per_class, examples=list(examples or []))

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "k": self.k, "fraction": self.fraction, "metrics": dict(self.metrics),
                "zero_tolerance": self.zero_tolerance, "per_class": self.per_class, "examples": self.examples}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "DynKStats":
        return cls(epoch=int(data["epoch"]), k=None if data.get("k") is None else int(data["k"]),
                   fraction=float(data["fraction"]), metrics=dict(data["metrics"]),
                   zero_tolerance=float(data["zero_tolerance"]), per_class=list(data["per_class"]),
                   examples=list(data["examples"]))
