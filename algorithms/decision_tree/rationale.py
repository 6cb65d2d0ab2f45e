"""Rationales: each image's first-order decomposition of its predicted class score over the units of a probe layer
(Zhang et al., CVPR 2019, Sec. 3): y ~ sum_d g_d x_d + b, g = dy/dx, and unit d contributes rho_d = g_d x_d.

Two ways to get rho, chosen by what the model offers (core/protocol.py):
- `unit_head` (exact): a `UnitHead` decides by a sum over units, y_c = sum_j a_j W_cj (+ b_c), so rho_j = a_j W_cj on
  the routed connections (a `RoutedUnitHead`, Dynamic-K) and sum_j rho_j = y - b with no remainder. This covers the
  cnn, icnn and dynconn (pooled channels of `unit_layer`) and ProtoPNet (prototype similarities x last layer: the
  prototypes are the units).
- `gradient` (any `Interpretable` model, any probe layer): rho_d = sum_{h,w} (dy/dx_dhw) x_dhw, the gradient x
  activation pooled over the unit's map, by one backward pass from the layer up (core.probe.capture(leaf=True)).
  For a head that is linear in the layer's pooled map it equals the exact form; otherwise y - b - sum rho is the
  Taylor remainder, reported as `residual`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.composability import head_bias, routed_evidence
from core import distributed as D
from core import probe as P
from core.errors import ConfigError
from core.protocol import UnitHead

SOURCES = ("auto", "unit_head", "gradient")


@dataclass
class Rationales:
    """rho [N, D] (unit contributions to the predicted class score), scores [N] (that score y), residual [N]
    (y - sum rho: the head's bias for the exact form, bias + Taylor remainder for the gradient form), pred [N],
    labels [N] (or None), index [N] (probe indices, for DDP-gathered sets)."""
    rho: torch.Tensor
    scores: torch.Tensor
    residual: torch.Tensor
    pred: torch.Tensor
    source: str
    layer: str
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.rho.shape[0])


def choose_source(model, layer: str | None, source: str = "auto", option: str = "source") -> tuple[str, str]:
    """(source, layer): `auto` takes the exact unit-head form when the model is a UnitHead and `layer` is its unit
    layer (or unset), else the gradient form on `layer` (default: the model's default probe layer)."""
    if source not in SOURCES:
        raise ConfigError(f"{option}={source!r}: choose one of {', '.join(SOURCES)}")
    is_head = isinstance(model, UnitHead)
    if source == "unit_head" and not is_head:
        raise ConfigError(f"{option}=unit_head: {type(model).__name__} is not a core.protocol.UnitHead (no "
                          f"unit_contributions); use gradient or auto")
    if source == "auto":
        source = "unit_head" if is_head and (layer is None or layer == model.unit_layer) else "gradient"
    if source == "unit_head":
        if layer is not None and layer != model.unit_layer:
            raise ConfigError(f"{option}=unit_head decomposes over {type(model).__name__}.unit_layer="
                              f"{model.unit_layer!r}, not layer={layer!r}; use source=gradient for another layer")
        return source, model.unit_layer
    return source, P.resolve_one(model, layer).name


def gradient_rationale(model, x: torch.Tensor, layer: str, target: torch.Tensor | None = None):
    """(rho [B, D], scores y [B], pred [B]) by gradient x activation at `layer`, summed over its spatial positions.
    target: the class to explain per image (default: the predicted class)."""
    with torch.enable_grad():
        out = P.capture(model, layer, x, leaf=True)
        act, logits = out.acts[layer], out.scores
        pred = logits.detach().argmax(1) if target is None else target
        y = logits.gather(1, pred[:, None])[:, 0]
        (grad,) = torch.autograd.grad(y.sum(), act)
    rho = (grad * act.detach()).flatten(2).sum(-1) if act.dim() > 2 else grad * act.detach()
    return rho.detach(), y.detach(), pred


def unit_head_rationale(model, x: torch.Tensor, bias: torch.Tensor, units=None):
    """(rho [B, D], scores y [B], pred [B]) exactly from the head: rho_j = a_j W_{pred j} on the routed units.
    units: the output of `unit_contributions(x)` when already computed (the epoch's shared probe pass)."""
    s, routed, pred, _ = routed_evidence(model, x, bias, units=units)
    rho = (s * routed).detach()
    return rho, rho.sum(1) + bias[pred], pred


@torch.no_grad()
def collect_rationales(model, loader, layer: str | None = None, source: str = "auto", device=None,
                       option: str = "source", gather: bool = True) -> Rationales:
    """Rationales of every image of `loader` (items with "image", optional "label" / "index", and "units" when the
    loader is a shared probe pass that holds the output of `unit_contributions`: the unit-head form then runs no
    model pass of its own). Under DDP each rank reads its shard and, with `gather`, every rank returns the
    rationales of the whole probe set (in rank order), so the tree built from them is the same on every rank."""
    source, layer = choose_source(model, layer, source, option)
    device = device or P.model_device(model)
    parts: dict[str, list[torch.Tensor]] = {"rho": [], "scores": [], "residual": [], "pred": [], "labels": [],
                                            "index": []}
    bias = None
    error = None
    try:
        for batch in loader:
            x = batch["image"].to(device)
            if source == "unit_head":
                if bias is None:
                    bias = head_bias(model, x)
                rho, y, pred = unit_head_rationale(model, x, bias, units=batch.get("units"))
            else:
                rho, y, pred = gradient_rationale(model, x, layer)
            parts["rho"].append(rho.float())
            parts["scores"].append(y.float())
            parts["residual"].append((y - rho.sum(1)).float())
            parts["pred"].append(pred)
            if "label" in batch:
                parts["labels"].append(torch.as_tensor(batch["label"]).to(device))
            if "index" in batch:
                parts["index"].append(torch.as_tensor(batch["index"]).to(device))
    except Exception as err:  # noqa: BLE001 - raised on every rank together
        error = err
    D.raise_together(error, device)
    out = {k: torch.cat(v) if v else None for k, v in parts.items()}
    if gather and D.world_size() > 1:
        # as objects: a rank whose shard is empty knows neither the number of units nor which fields exist
        shards = D.all_gather_object({k: None if v is None else v.cpu() for k, v in out.items()})
        out = {k: (torch.cat(got).to(device) if (got := [sh[k] for sh in shards if sh[k] is not None]) else None)
               for k in out}
    if out["rho"] is None:
        raise ValueError("collect_rationales: the loader gave no images")
    return Rationales(out["rho"], out["scores"], out["residual"], out["pred"], source, layer,
                      labels=out["labels"], index=out["index"])
