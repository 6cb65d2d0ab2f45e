"""One forward pass over the probe set per epoch, shared by the methods that read the same images: dissection (the
maps of its layers), composability (the unit activations and class weights of `unit_contributions`, and the
dissection of the unit layer). Plain code (no Lightning); callbacks/dissection.py builds it once per epoch.

    shared = ProbePass.build(model, ["backbone.conv4"], DataLoader(probe, batch_size=100), units=True)
    dissect(model, ["backbone.conv4"], shared)     # reads batch["maps"] instead of running the model
    compose(model, shared, dissection)             # reads batch["units"] = (activations [B, D], weights [K, D])

Each batch of the pass is the loader's batch dict plus "maps" ({layer: [B, U, h, w]}, detached) and, with
units=True, "units": the output of `unit_contributions(x)`, whose forward pass the hooks ride on (so the layer maps
cost nothing extra). The pass is the same computation each consumer would run on its own (eval mode, no grad, the
same batches): results equal those of separate passes (tests/test_probe_pass.py). When the captured tensors would
exceed `max_mb` the pass is not kept (build returns None) and each consumer reads the loader itself, as before.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from core import distributed as D
from core import probe as P


class CollatedBatches:
    """A loader's batches read once and kept (a probe set is the same every epoch, and reading and collating its
    items is about half the cost of a forward pass over them on a small model): iterable like the loader, with its
    `dataset` and length. `prepare(batch)`, when given, runs once on each batch as it is read and may add what depends
    on the batch alone (dissection adds its union labels, "seg_union"), so that it too is computed once per fit; a
    ProbePass over these batches inherits it. `batches` is None when they would take more than `max_mb`; the caller
    then reads the loader every epoch."""

    def __init__(self, batches: list[dict] | None, dataset):
        self.batches, self.dataset = batches, dataset

    @classmethod
    def read(cls, loader, max_mb: float, prepare: Callable[[dict], object] | None = None) -> "CollatedBatches":
        batches, size = [], 0.0
        for batch in loader:
            if prepare is not None:
                prepare(batch)
            size += sum(t.numel() * t.element_size() for t in batch.values() if torch.is_tensor(t))
            if size > max_mb * 2 ** 20:
                return cls(None, getattr(loader, "dataset", None))
            batches.append(batch)
        return cls(batches, getattr(loader, "dataset", None))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ProbePass:
    """The probe batches of one rank with their captured maps (iterable like the loader; `dataset` is the loader's)."""

    def __init__(self, batches: list[dict], dataset, layers: list[str], units: bool):
        self.batches, self.dataset, self.layers, self.units = batches, dataset, layers, units

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, points: Mapping[str, P.HookPoint], loader: Iterable[dict], units: bool = False,
              max_mb: float = 2048.0, device=None, progress: Callable | None = None) -> "ProbePass | None":
        """Run `model` once over `loader`, capturing `points` (and `unit_contributions` when `units`). Every rank
        builds its own shard's pass; a failure is raised on every rank together, and whether the pass is kept
        (within `max_mb` on every rank) is agreed, so all ranks then take the same path. Each item is a copy of the
        loader's batch dict (what a `CollatedBatches.read` prepared included) plus the captured tensors."""
        device = device or P.model_device(model)
        if max_mb <= 0:
            return None
        total = len(loader) if hasattr(loader, "__len__") else None
        forward = model.unit_contributions if units else None
        batches: list[dict] = []
        size, too_big, error = 0.0, False, None
        try:
            for batch in (progress or (lambda it, desc: it))(loader, "probe pass"):
                x = batch["image"].to(device, non_blocking=True)
                # with units the hooks ride on unit_contributions' own forward pass (no early stop: it needs it all)
                cap = P.capture(model, None, x, points=points, scores=units, forward=forward)
                item = dict(batch, image=x, maps=cap.acts)
                if units:
                    item["units"] = tuple(t.detach() for t in cap.scores)
                size += sum(t.numel() * t.element_size() for t in (*cap.acts.values(), *item.get("units", ()), x))
                # the first batch tells the whole pass's size: a pass that will not fit stops there
                if max(size, size * (total or 0) / (len(batches) + 1)) > max_mb * 2 ** 20:
                    too_big = True
                    break
                batches.append(item)
        except Exception as err:  # noqa: BLE001 - raised on every rank together
            error = err
        D.raise_together(error, device)
        if D.agree_any(too_big, device=device):
            return None
        return cls(batches, getattr(loader, "dataset", None), list(points), units)


def batch_maps(model: nn.Module, points: Mapping[str, P.HookPoint], batch: dict) -> "dict[str, torch.Tensor]":
    """The maps of `points` for a probe batch: those a ProbePass captured, else from one forward pass."""
    maps = batch.get("maps") or {}
    if all(n in maps for n in points):
        return {n: maps[n] for n in points}
    return P.capture(model, None, batch["image"].to(P.model_device(model)), points=points).acts
