"""The per-epoch attribution callback: evaluates the maps of algorithms/attribution on the probe set (sharded over
ranks, sums all-reduced), renders overlays on rank 0 and logs interp/attribution/<method>/<metric>. The methods and
their evaluation are plain code in algorithms/attribution/."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from algorithms.attribution import (MAX_DELETION_STEPS, METHODS, SPLITS, TARGETS, AttributionResult, attribution_maps,
                                    cam_unavailable, method_unavailable, collate_probe, evaluate, layer_point, probe_items)
from algorithms.attribution.render import render_overlays
from algorithms.attribution.targets import explained_classes
from callbacks.base import InterpretationCallback, check_int
from core import distributed as D
from core.errors import ConfigError
from core.probe import default_layer, probe_layers
from core.protocol import UnitHead

log = logging.getLogger(__name__)

ALL_METHODS = ("gradcam", "cam", "saliency", "guided_backprop", "guided_gradcam", "occlusion", "prototype_maps")


class AttributionCallback(InterpretationCallback):
    """Every `every_n_epochs`: attribution maps of the probe set (first `max_images`, sharded over ranks), evaluated
    with the pointing game and energy inside the object mask (where the data has masks), deletion AUC, and the
    model-randomisation sanity check for `sanity_method`; metrics summed over ranks. Rank 0 renders overlays of the
    first `num_render` images for `render_methods` (PNG + W&B) and writes metrics.json (AttributionResult) into the
    epoch folder. CAM is left out (one info line) where the model has no sum-over-units head whose activations are
    the layer's global average.

    Metrics: interp/attribution/<method>/{pointing_game, pointing_game_strict, energy, deletion_auc},
    interp/attribution/<sanity_method>/sanity_spearman. Defaults: conf/callbacks/attribution.yaml."""

    name = "attribution"

    def __init__(self, methods: Sequence[str] = ("gradcam", "cam", "saliency", "prototype_maps"),
                 render_methods: Sequence[str] = ALL_METHODS, layer: str | None = None, target: str = "true",
                 max_images: int = 64, num_render: int = 8,
                 deletion_steps: int = 10, deletion_methods: Sequence[str] | None = ("gradcam",),
                 sanity_method: str | None = "gradcam", sanity_layers: int = 1, sanity_size: int = 32,
                 pointing_tolerance: float = 0.067, split: str = "val", seed: int = 0, every_n_epochs: int = 1,
                 render_every_n_epochs: int = 5, **kwargs):
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        for key, names in (("methods", methods), ("render_methods", render_methods),
                           ("deletion_methods", deletion_methods or []),
                           ("sanity_method", [sanity_method] if sanity_method else [])):
            if isinstance(names, str):
                raise ConfigError(f"{self.option(key)}={names!r}: give a list, e.g. [{names}]")
            unknown = [m for m in names if m not in METHODS]
            if unknown:
                raise ConfigError(f"{self.option(key)}: unknown attribution method(s) {unknown}; choose from "
                                  f"{', '.join(METHODS)}")
        if target not in TARGETS:
            raise ConfigError(f"{self.option('target')}={target!r}: use 'true' (the label) or 'predicted'")
        if split not in SPLITS:
            raise ConfigError(f"{self.option('split')}={split!r}: use one of {', '.join(SPLITS)}")
        self.deletion_steps = check_int(deletion_steps, self.option("deletion_steps"), 1)
        if self.deletion_steps > MAX_DELETION_STEPS:
            raise ConfigError(f"{self.option('deletion_steps')}={deletion_steps}: use 1..{MAX_DELETION_STEPS} (the "
                              f"deletion curve is computed every run)")
        self.max_images = check_int(max_images, self.option("max_images"), 1)
        self.num_render = check_int(num_render, self.option("num_render"), 0)
        self.render_every_n_epochs = check_int(render_every_n_epochs, self.option("render_every_n_epochs"), 1)
        self.sanity_layers = check_int(sanity_layers, self.option("sanity_layers"), 1)
        self.sanity_size = check_int(sanity_size, self.option("sanity_size"), 2)
        try:
            self.pointing_tolerance = float(pointing_tolerance)
        except (TypeError, ValueError):
            self.pointing_tolerance = -1.0
        if not 0 <= self.pointing_tolerance < 1:
            raise ConfigError(f"{self.option('pointing_tolerance')}={pointing_tolerance!r}: a fraction of the image "
                              f"side in [0, 1) (0.067 = Zhang et al.'s 15 px at 224 px)")
        self.methods, self.render_methods = list(methods), list(render_methods)
        self.deletion_methods = list(self.methods if deletion_methods is None else deletion_methods)
        self.layer, self.target, self.sanity_method = layer, target, sanity_method
        self.split, self.seed = split, int(seed)
        self._cam_logged = False

    # ----- before training ------------------------------------------------------------------------------------
    def validate(self, trainer, module, datamodule) -> None:
        layer_point(module, self.layer, self.option("layer"))  # unknown names list the valid ones
        n_layers = len(probe_layers(module))
        if self.sanity_method and self.sanity_layers > n_layers:
            raise ConfigError(f"{self.option('sanity_layers')}={self.sanity_layers}: the model has {n_layers} probe "
                              f"layers ({', '.join(probe_layers(module))}); use 1..{n_layers}")
        if "cam" in self.methods + self.render_methods + [self.sanity_method] and not isinstance(module, UnitHead):
            self._log_cam_skipped(module, "the model has no sum-over-units head (core.protocol.UnitHead)")
        if datamodule is not None:
            ds, _ = probe_items(datamodule, self.split, 1)
            if len(ds) == 0:
                raise ConfigError(f"{self.option('split')}={self.split!r}: the {self.split} split has no images")

    def _log_cam_skipped(self, module, why: str) -> None:
        if not self._cam_logged and self.is_rank_zero:  # once per run, not every epoch
            log.info("%s: cam skipped for %s (%s)", self.option("methods"), type(module).__name__, why)
        self._cam_logged = True

    def _log_unavailable(self, module, reasons: dict[str, str]) -> None:
        """Methods that need a capability the model lacks (prototype_maps on a model without prototypes): once."""
        if reasons and not getattr(self, "_unavailable_logged", False) and self.is_rank_zero:
            for m, why in reasons.items():
                log.info("%s: %s skipped for %s (%s)", self.option("methods"), m, type(module).__name__, why)
        self._unavailable_logged = True

    # ----- every few epochs -------------------------------------------------------------------------------------
    def run(self, trainer, module, epoch):
        device = module.device
        ds, masks = probe_items(self.datamodule(trainer), self.split, self.max_images)
        why_not_cam = ""
        if "cam" in self.methods + self.render_methods + [self.sanity_method]:  # one image tells if CAM applies
            why_not_cam = cam_unavailable(module, collate_probe([ds[0]], None)["image"].to(device), self.layer)
        if why_not_cam:
            self._log_cam_skipped(module, why_not_cam)
        missing = {m: method_unavailable(m, module) for m in METHODS}
        missing["cam"] = missing["cam"] or why_not_cam
        self._log_unavailable(module, {m: why for m, why in missing.items() if why and m != "cam"
                                       and m in self.methods + self.render_methods})
        keep = lambda names: [m for m in names if not missing.get(m)]  # noqa: E731
        methods = keep(self.methods)
        loader = DataLoader(self.shard(ds), batch_size=self.batch_size, shuffle=False, num_workers=0,
                            collate_fn=lambda items: collate_probe(items, masks))
        totals = evaluate(module, self.progress(loader, "maps", total=len(loader)), methods, self.layer,
                          target=self.target, deletion_methods=keep(self.deletion_methods),
                          deletion_steps=self.deletion_steps, pointing_tolerance=self.pointing_tolerance,
                          sanity_method=(keep([self.sanity_method]) or [None])[0], sanity_layers=self.sanity_layers,
                          sanity_size=self.sanity_size, seed=self.seed, max_batch=self.batch_size)
        totals = totals.unpacked(D.all_reduce_sum(totals.packed()))
        result = AttributionResult(layer=self.layer or default_layer(module), target=self.target,
                                   num_images=len(ds), metrics=totals.metrics(), epoch=int(epoch))
        if self.is_rank_zero:
            out = self.epoch_dir(trainer, epoch)
            result.save(out / "metrics.json")
            if self.render_due(trainer, self.render_every_n_epochs):
                self._render(trainer, module, ds, masks, out, keep(self.render_methods), int(epoch))
        return result.flat()

    def _render(self, trainer, module, ds, masks, out, methods, epoch: int):
        """Rank 0 only, no collectives: overlays of the first num_render probe images."""
        n = min(self.num_render, len(ds))
        if n == 0 or not methods:
            return
        batch = collate_probe([ds[i] for i in range(n)], masks)
        x = batch["image"].to(module.device).clone()
        target = explained_classes(module, x, batch["label"].to(module.device), self.target)
        maps, target = attribution_maps(module, x, methods, self.layer, target)
        dm = self.datamodule(trainer)
        raw = batch["raw"] if batch["raw"] is not None else (
            dm.denormalize(x) if hasattr(dm, "denormalize") else (x - x.min()) / (x.max() - x.min() + 1e-12))
        names = getattr(dm, "class_names", None)
        titles = [f"{names[int(t)] if names else int(t)}" for t in target] if target is not None else None
        path = out / "overlays.png"
        layer = self.layer or default_layer(module)
        render_overlays(raw, maps, path, titles and [f"probe {i}\nexplained:\n{t}" for i, t in enumerate(titles)],
                        title=f"attribution maps, epoch {epoch} (Grad-CAM at {layer})")
        self.log_images(trainer, "overlays", [path])
