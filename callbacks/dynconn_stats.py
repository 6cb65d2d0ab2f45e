"""Explanations and sparsity of a Dynamic-K head (Sun, Ravi & Singh, ICCV 2019).

- `explain_decisions(model, images)`: per image, the routed units of the predicted class with their contributions
  s_j = x_j W_cj and shares s_j / sum_j |s_j| ("computer room = screen 41% + office 31% + office 28%").
- `units_for_evidence(evidence, fraction)`: how many units it takes to reach `fraction` of sum_j |s_j|.
- `weight_sparsity(weight)`: non-zero weights per class.
Work for any head given as evidence [N, D] (the dense head's x_j W_cj, or the routed evidence of a Dynamic-K head),
so the dense cnn and dynconn are measured with the same ruler.
The callback logs `interp/dynconn/{units_for_90pct, nonzero_weights_per_class, routed_share_top1, ...}` every epoch.
"""
from __future__ import annotations

import torch
from pytorch_lightning import LightningModule, Trainer

from core import distributed as D
from callbacks.base import InterpretationCallback, write_json

#: |w| below this fraction of the class's largest |w| counts as zero (weight decay shrinks unrouted weights towards
#: 0 but never to exactly 0)
ZERO_TOLERANCE = 1e-2


def predicted_evidence(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(evidence [N, D] of each image's predicted class, predicted classes [N], class scores [N, C]).

    For a Dynamic-K head the evidence is the routed one (x_j W_cj on the top-K units, 0 elsewhere); for a dense
    linear head every unit's x_j W_cj."""
    features = model.features(images)
    head = model.head
    if hasattr(head, "unit_evidence"):
        evidence = head.unit_evidence(features)                                  # [N, C, D]
        scores = evidence.sum(-1) + head.bias
    else:
        evidence = features[:, None, :] * head.weight[None]
        scores = evidence.sum(-1) + (head.bias if head.bias is not None else 0.0)
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
    """Non-zero weights per class [C]: |w_cj| > tolerance * max_j |w_cj|."""
    w = weight.detach().abs()
    return (w > tolerance * w.amax(1, keepdim=True)).sum(1)


@torch.no_grad()
def explain_decisions(model, images: torch.Tensor, top: int | None = None, unit_names=None) -> list[dict]:
    """Per image: predicted class, its score, bias, and the `top` (default: K for Dynamic-K, 5 otherwise) units with
    their contributions s_j and shares s_j / sum_j |s_j|. For Dynamic-K the contributions of the routed units sum to
    score - bias exactly."""
    evidence, pred, scores = predicted_evidence(model, images)
    k = top or getattr(model.head, "k", 5)
    k = min(k, evidence.shape[1])
    total = evidence.abs().sum(1, keepdim=True).clamp_min(1e-12)
    top_vals, top_idx = evidence.abs().topk(k, dim=1)
    contrib = evidence.gather(1, top_idx)
    shares = contrib / total
    bias = model.head.bias[pred]
    out = []
    for n in range(images.shape[0]):
        units = top_idx[n].tolist()
        out.append({"predicted": int(pred[n]), "score": float(scores[n, pred[n]]), "bias": float(bias[n]),
                    "evidence": float(evidence[n].sum()), "units": units,
                    "unit_names": [unit_names[u] for u in units] if unit_names else None,
                    "contributions": contrib[n].tolist(), "shares": shares[n].tolist()})
    return out


class DynConnStatsCallback(InterpretationCallback):
    """Sparsity of the Dynamic-K head's decisions on the validation set and of its weights, every epoch."""

    name = "dynconn"

    def __init__(self, fraction: float = 0.9, max_images: int = 512, num_examples: int = 8, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"callbacks.dynconn_stats.fraction={fraction}: must lie in (0, 1]")
        self.fraction = float(fraction)
        self.max_images = int(max_images)
        self.num_examples = int(num_examples)

    def applies_to(self, module: LightningModule) -> bool:
        from models.dynconn import DynConnClassifier
        return isinstance(module, DynConnClassifier)

    def run(self, trainer: Trainer, module, epoch: int) -> dict[str, float]:
        dm = self.datamodule(trainer)
        ds = dm.val_dataloader().dataset
        n_total = min(len(ds), self.max_images)
        subset = torch.utils.data.Subset(ds, range(n_total))
        C = module.num_classes
        dev = module.device
        units_sum = torch.zeros(C, device=dev, dtype=torch.float64)
        top1_sum = torch.zeros((), device=dev, dtype=torch.float64)
        count = torch.zeros(C, device=dev, dtype=torch.float64)
        examples: list = []
        with torch.no_grad():
            for batch in self.loader(self.shard(subset)):
                x = batch[0].to(dev)
                evidence, pred, _ = predicted_evidence(module, x)
                n_units = units_for_evidence(evidence, self.fraction).double()
                units_sum.index_add_(0, pred, n_units)
                count.index_add_(0, pred, torch.ones_like(n_units))
                share = evidence.abs().amax(1) / evidence.abs().sum(1).clamp_min(1e-12)
                top1_sum += share.double().sum()
                if self.is_rank_zero and len(examples) < self.num_examples:
                    examples += explain_decisions(module, x[: self.num_examples - len(examples)])
        units_sum, count, top1_sum = (D.all_reduce_sum(t) for t in (units_sum, count, top1_sum))
        nonzero = weight_sparsity(module.head.weight).double()
        images = count.sum().clamp_min(1)
        pct = int(round(self.fraction * 100))
        metrics = {f"units_for_{pct}pct": float(units_sum.sum() / images),
                   "routed_share_top1": float(top1_sum / images),
                   "nonzero_weights_per_class": float(nonzero.mean()),
                   "nonzero_weights_fraction": float(nonzero.mean() / module.head.weight.shape[1])}
        if self.is_rank_zero:
            per_class = (units_sum / count.clamp_min(1)).tolist()
            names = list(getattr(dm, "class_names", None) or [str(c) for c in range(C)])
            rows = [[names[c], int(nonzero[c]), per_class[c], int(count[c])] for c in range(C)]
            out_dir = self.epoch_dir(trainer, epoch)
            write_json(out_dir / "dynconn.json", {
                "epoch": epoch, "k": getattr(module.head, "k", None), "fraction": self.fraction,
                "metrics": metrics, "zero_tolerance": ZERO_TOLERANCE,
                "per_class": [{"class": r[0], "nonzero_weights": r[1], f"units_for_{pct}pct": r[2],
                               "predicted_images": r[3]} for r in rows],
                "examples": examples})
            self.log_table(trainer, "per_class", ["class", "nonzero_weights", f"units_for_{pct}pct", "images"],
                           rows)
        return metrics
