"""Objectives of feature visualization (Olah et al., Distill 2017): callables ctx -> [B] (one value per batch
element) that add, subtract and scale, so the caller composes them: `channel(...) - 0.1 * diversity(...)`. ctx is
what core.probe.capture returns: `ctx.acts[layer name]` (`<layer>:pre_relu` for the input of the layer's last ReLU)
and `ctx.scores` (the class scores, None unless a term needs them)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.probe import POOLINGS


class Objective:
    """`fn(ctx) -> [B]` where ctx.acts[layer name] is that layer's output and ctx.scores the class scores (None
    unless some term needs them). Objectives add, subtract and scale: `channel(...) - 0.1 * diversity(...)`."""

    def __init__(self, fn: Callable, layers: Sequence[str] = (), needs_scores: bool = False, name: str = ""):
        self.fn, self.layers, self.needs_scores, self.name = fn, tuple(dict.fromkeys(layers)), needs_scores, name

    def __call__(self, ctx) -> Tensor:
        return self.fn(ctx)

    def _combine(self, other, op, symbol):
        if isinstance(other, Objective):
            return Objective(lambda ctx: op(self(ctx), other(ctx)), self.layers + other.layers,
                             self.needs_scores or other.needs_scores, f"({self.name} {symbol} {other.name})")
        return Objective(lambda ctx: op(self(ctx), other), self.layers, self.needs_scores,
                         f"({self.name} {symbol} {other})")

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b, "+")

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b, "-")

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, Objective):
            raise TypeError("objectives are scaled by numbers, not multiplied together")
        return self._combine(other, lambda a, b: a * b, "*")

    __rmul__ = __mul__

    def __neg__(self):
        return Objective(lambda ctx: -self(ctx), self.layers, self.needs_scores, f"-{self.name}")


def _per_element(values: Tensor, units: Tensor, offset: int) -> Tensor:
    """values [B, D...] -> [B]: element offset + i gets unit units[i]; other elements 0."""
    B = values.shape[0]
    out = values.new_zeros(B)
    idx = torch.arange(offset, offset + len(units), device=values.device)
    if idx.numel() and int(idx[-1]) >= B:
        raise ValueError(f"the objective addresses batch elements {offset}..{offset + len(units) - 1} but the batch "
                         f"has {B}; make the parametrisation's batch as large as the number of units")
    return out.index_put((idx,), values[idx, units.to(values.device)])


def _units(units) -> Tensor:
    return torch.as_tensor([units] if isinstance(units, int) else list(units), dtype=torch.long)


def channel(layer: str, units, offset: int = 0, pooling: str = "mean") -> Objective:
    """Activation of channel units[i] of `layer` for batch element offset + i: its spatial mean (Olah et al.), or its
    maximum over positions (`pooling="max"`: how ProtoPNet's last layer reads a prototype's similarity map)."""
    u = _units(units)
    if pooling not in POOLINGS:
        raise ValueError(f"channel pooling={pooling!r}: use one of {', '.join(POOLINGS)}")

    def fn(ctx):
        a = ctx.acts[layer]
        if a.dim() == 4:
            a = a.mean((2, 3)) if pooling == "mean" else a.amax((2, 3))
        return _per_element(a, u, offset)
    return Objective(fn, [layer], name=f"channel({layer})" if pooling == "mean" else f"channel_max({layer})")


def neuron(layer: str, units, y: int | None = None, x: int | None = None, offset: int = 0) -> Objective:
    """Activation of channel units[i] at one spatial position (the centre by default) for element offset + i."""
    u = _units(units)

    def fn(ctx):
        a = ctx.acts[layer]
        h, w = a.shape[-2:]
        return _per_element(a[:, :, h // 2 if y is None else y, w // 2 if x is None else x], u, offset)
    return Objective(fn, [layer], name=f"neuron({layer})")


def class_logit(classes, offset: int = 0) -> Objective:
    """Class score (logit; capsule length for CapsNet) of classes[i] for element offset + i."""
    c = _units(classes)
    return Objective(lambda ctx: _per_element(ctx.scores, c, offset), needs_scores=True, name="class_logit")


def diversity(layer: str) -> Objective:
    """Minus the mean cosine similarity of each element's Gram matrix (channel correlations) to the others' (the
    diversity term of Olah et al.); add it with a negative weight... it is already negated: maximise it."""

    def fn(ctx):
        a = ctx.acts[layer]
        B, C = a.shape[:2]
        if B < 2:
            return a.new_zeros(B)
        flat = a.flatten(2)
        gram = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
        sim = gram @ gram.T
        return -(sim.sum(1) - sim.diagonal()) / (B - 1)
    return Objective(fn, [layer], name=f"diversity({layer})")


def unit_objective(layer: str, jobs: Sequence[tuple[str, int]], pooling: str = "mean") -> Objective | None:
    """One batch element per job: ("unit", u) raises channel u of `layer` (`channel` with `pooling`), ("class", c)
    the score of class c. Units come before classes (the order of `featviz_jobs`, in every shard of it)."""
    units = [(i, v) for i, (kind, v) in enumerate(jobs) if kind == "unit"]
    classes = [(i, v) for i, (kind, v) in enumerate(jobs) if kind == "class"]
    obj = None
    if units:
        obj = channel(layer, [v for _, v in units], offset=units[0][0], pooling=pooling)
    if classes:
        c = class_logit([v for _, v in classes], offset=classes[0][0])
        obj = c if obj is None else obj + c
    return obj


def featviz_jobs(num_units: int, num_classes: int = 0) -> list[tuple[str, int]]:
    """The batch elements of a visualisation run: units 0..num_units-1, then classes 0..num_classes-1."""
    return [("unit", u) for u in range(num_units)] + [("class", c) for c in range(num_classes)]
