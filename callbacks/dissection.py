"""The network dissection callback: dissects probe layers after training epochs and hands its results to other
callbacks (composability) once per epoch. The method is algorithms/dissection.py; this file schedules, shards, writes
and logs.

Outputs in <run>/interp/dissection/epoch_NNN/: <layer>.csv (NetDissect columns), dissection.json
(algorithms.dissection_result.DissectionEpoch: every dissected layer's DissectionResult), <layer>_summary.png,
<layer>_gallery.png; W&B: a table per layer and the PNGs; scalars interp/dissection/{interpretable_units,
unique_concepts, interpretable_fraction, mean_best_iou, category/<c>} for the first layer and <layer>/<metric> for
every layer when several are dissected.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Sequence

from torch.utils.data import Dataset

from algorithms.dissection import DissectionEpoch, DissectionResult, batch_union, dissect, layer_maps
from algorithms.dissection_render import render_gallery, render_summary
from algorithms.probe_pass import CollatedBatches, ProbePass
from algorithms.dissection_stats import IOU_THRESHOLD, TOP_QUANTILE
from algorithms.probe_sets import DissectionError, base_dataset, check_probe_dataset, open_broden, probe_view
from callbacks.base import InterpretationCallback, check_fraction, check_int
from core import distributed as D
from core import probe as P
from core.errors import ConfigError

log = logging.getLogger(__name__)


class DissectionCallback(InterpretationCallback):
    """Dissects `layers` (default: the model's default probe layer) every `every_n_epochs` epochs.

    probe: null -> `datamodule.probe_dataset(probe_split)` (without one the callback switches itself off before
    training, with one warning); a path -> a real Broden folder. probe_size: the first N probe images (null = all).

    As a provider (`depends_on = ("dissection",)`), `result(trainer, module, epoch, layer)` gives the dissection of a
    layer at an epoch, computed at most once per epoch whichever callback asks first, also at epochs outside this
    callback's own schedule.
    """

    name = "dissection"

    def __init__(self, layers: str | Sequence[str] | None = None, probe: str | None = None,
                 probe_split: str = "val", probe_size: int | None = 300, quantile: float = TOP_QUANTILE,
                 iou_threshold: float = IOU_THRESHOLD, top_images: int = 5, gallery_units: int = 8,
                 render_every_n_epochs: int = 5, every_n_epochs: int = 1, run_on_last_epoch: bool = True,
                 batch_size: int = 100, cache_mb: float = 2048.0, **kwargs):
        super().__init__(every_n_epochs=every_n_epochs, run_on_last_epoch=run_on_last_epoch, batch_size=batch_size,
                         **kwargs)
        self.layers = [layers] if isinstance(layers, str) else (list(layers) if layers else None)
        self.probe, self.probe_split = probe, probe_split
        self.probe_size = probe_size
        self.quantile, self.iou_threshold = quantile, iou_threshold
        self.top_images, self.gallery_units = top_images, gallery_units
        self.render_every_n_epochs, self.cache_mb = render_every_n_epochs, cache_mb
        self.check_settings()
        self._probe_cache: Dataset | None = None
        self._warned = False
        self.results: "OrderedDict[str, DissectionResult]" = OrderedDict()   # the last run's
        self.results_epoch: int | None = None
        self.num_runs = 0
        # what other callbacks read from the epoch's shared probe pass (share_probe_pass)
        self._shared_layers: list[str] = []
        self._shared_units = False
        self._collated: CollatedBatches | None = None
        self._shard = None

    # ----- settings ---------------------------------------------------------------------------------------------
    def check_settings(self) -> None:
        """The settings that are wrong whatever the model and data."""
        self.quantile = check_fraction(self.quantile, self.option("quantile"))      # 0.005 = the top 0.5%
        self.iou_threshold = check_fraction(self.iou_threshold, self.option("iou_threshold"))
        self.probe_size = check_int(self.probe_size, self.option("probe_size"), 1, allow_none=True)
        self.top_images = check_int(self.top_images, self.option("top_images"), 1)
        self.gallery_units = check_int(self.gallery_units, self.option("gallery_units"), 0)
        self.render_every_n_epochs = check_int(self.render_every_n_epochs, self.option("render_every_n_epochs"), 1)
        try:
            self.cache_mb = float(self.cache_mb)
        except (TypeError, ValueError):
            self.cache_mb = -1.0
        if not self.cache_mb >= 0:
            raise ConfigError(f"{self.option('cache_mb')}={self.cache_mb!r}: must be a number >= 0 (MiB of layer "
                              f"maps kept for the IoU pass; 0 = read the probe set twice)")
        if self.layers is not None and not all(isinstance(n, str) and n for n in self.layers):
            raise ConfigError(f"{self.option('layers')}={self.layers!r}: give probe layer names (or null for the "
                              f"model's default probe layer)")

    def layer_names(self, module) -> list[str]:
        """The configured layers (the default probe layer for null); unknown names raise a ConfigError listing the
        valid ones."""
        return list(P.resolve(module, self.layers, option=self.option("layers")))

    def validate(self, trainer, module, datamodule) -> None:
        self.check_settings()
        points = P.resolve(module, self.layers, option=self.option("layers"))
        probe = self.probe_dataset(trainer)
        if probe is None:
            if D.is_rank_zero() and not self._warned:  # setup runs again for trainer.test: one warning per run
                log.warning("%s: %s has no concept probe set, so dissection is off for this run (and composability, "
                            "which uses its labels); set %s=<Broden folder> or use datamodule=shapes",
                            self.option("")[:-1], type(datamodule).__name__, self.option("probe"))
            self._warned = True
            self._active = False
            return
        self.check_input(probe, module, points)

    def check_input(self, probe: Dataset, module, points) -> None:
        """The probe images fit the model and every layer gives spatial maps: one forward pass of one probe item."""
        image = probe[0]["image"]
        with P.interpretation_mode(module, grad=False):
            try:
                layer_maps(module, points, image[None].to(P.model_device(module)))
            except DissectionError:
                raise
            except Exception as err:  # noqa: BLE001 - said in terms of the settings
                shape = "x".join(str(v) for v in image.shape)
                raise DissectionError(f"{self.option('probe')}: the model cannot run on the probe images "
                                      f"({image.shape[0]} channels, shape {shape}): {type(err).__name__}: {err}; "
                                      f"use a probe set in the model's input format") from err

    # ----- the probe set (resolved once per fit) ------------------------------------------------------------------
    def probe_dataset(self, trainer) -> Dataset | None:
        if self._probe_cache is not None:
            return self._probe_cache
        dm = getattr(trainer, "datamodule", None)
        if self.probe:
            probe = open_broden(self.probe, split=self.probe_split, image_size=getattr(dm, "image_size", None),
                                mean=getattr(dm, "mean", None), std=getattr(dm, "std", None), limit=self.probe_size,
                                option=self.option("probe"))
        else:
            getter = getattr(dm, "probe_dataset", None)
            probe = getter(self.probe_split) if callable(getter) else None
            if probe is None:
                return None
        check_probe_dataset(probe, self.option("probe"))
        self._probe_cache = probe_view(probe, self.probe_size)
        return self._probe_cache

    def _probe(self, trainer, module) -> Dataset | None:
        """The probe set, with a failure to open it raised on every rank together."""
        probe, error = None, None
        try:
            probe = self.probe_dataset(trainer)
        except Exception as err:  # noqa: BLE001 - raised on every rank together
            error = err
        D.raise_together(error, P.model_device(module))
        return probe

    # ----- the provider -----------------------------------------------------------------------------------------
    def dissections(self, trainer, module, epoch: int,
                    layers: Sequence[str] | None = None) -> "OrderedDict[str, DissectionResult]":
        """The dissection of `layers` (default: the configured ones) at `epoch`, computed once per epoch."""
        names = self.layer_names(module) if layers is None else list(layers)
        return self.memo(epoch, ("dissect", tuple(names)), lambda: self._dissect(trainer, module, names, epoch))

    def result(self, trainer, module, epoch: int, layer: str) -> DissectionResult:
        """One layer's dissection at `epoch` (for callbacks that depend on dissection). A configured layer comes
        from the same computation as this callback's own run; another layer is dissected on its own."""
        configured = self.layer_names(module)
        return self.dissections(trainer, module, epoch, configured if layer in configured else [layer])[layer]

    def share_probe_pass(self, layers: Sequence[str] = (), units: bool = False) -> None:
        """Called by a dependent callback before training: the epoch's probe pass also captures `layers` (and the
        output of `unit_contributions` when `units`), so it reads them from there instead of its own pass."""
        self._shared_layers += [n for n in layers if n not in self._shared_layers]
        self._shared_units = self._shared_units or bool(units)

    def shares_probe(self, trainer, split: str, n: int) -> bool:
        """Whether the first `n` items of the datamodule's `split` probe set (what featviz and attribution read) are
        the first n of this callback's probe set, so a dependent can read their maps from the epoch's probe pass
        (`first_maps`) instead of running the model over them again."""
        if self.probe or split != self.probe_split or self._active is False or not self.enabled:
            return False
        try:
            probe = self.probe_dataset(trainer)
        except Exception:  # noqa: BLE001 - this callback reports it (setup); the dependent reads the images itself
            return False
        return probe is not None and len(probe) >= n

    def first_maps(self, trainer, module, epoch: int, layer: str, n: int):
        """[(maps of `layer` [b, U, h, w], dataset indices [b])] of this rank's probe items with index < n, from the
        epoch's probe pass (`share_probe_pass([layer])` before training); None when the pass was not kept
        (cache_mb) or does not hold the layer, and the caller runs the model itself."""
        shared = self.probe_batches(trainer, module, epoch)
        if not isinstance(shared, ProbePass) or layer not in shared.layers:
            return None
        out = []
        for batch in shared:
            if "index" not in batch:
                return None
            maps = batch["maps"][layer]
            index = batch["index"].to(maps.device)
            keep = index < n
            if keep.any():
                out.append((maps[keep], index[keep]))
        return out

    def collated(self, probe: Dataset, device):
        """This rank's probe batches as the loader gives them, read and collated once per fit and kept (the probe set
        is the same every epoch; `CollatedBatches`), or the loader itself when they would take more than half of
        cache_mb. Each batch's union labels (what dissection counts; they depend on the labels alone) are computed
        as it is read, so once per fit too. A failure to read an item is raised on every rank together (a
        collective: every rank calls this at the same point)."""
        if self._collated is None or self._collated.dataset is not self.shard_of(probe):
            collated, error = None, None
            try:
                num_concepts = len(base_dataset(probe).concept_names) - 1
                collated = CollatedBatches.read(self.loader(self.shard_of(probe)), self.cache_mb / 2,
                                                prepare=lambda batch: batch_union(batch, num_concepts, "cpu"))
            except Exception as err:  # noqa: BLE001 - raised on every rank together
                error = err
            D.raise_together(error, device)
            self._collated = collated
        return self._collated if self._collated.batches is not None else self.loader(self.shard_of(probe))

    def shard_of(self, probe: Dataset):
        """This rank's shard of the probe set (one Subset object per probe set, so the collated batches know it)."""
        if self._shard is None or self._shard.dataset is not probe:
            self._shard = self.shard(probe)
        return self._shard

    def probe_batches(self, trainer, module, epoch: int):
        """This rank's probe batches for `epoch`: the shared algorithms.probe_pass.ProbePass (one forward pass over
        the probe set for dissection and its dependents, computed once per epoch), or the plain loader when the
        captured maps would exceed cache_mb."""
        probe = self._probe(trainer, module)
        if probe is None:
            raise DissectionError(f"{self.option('probe')}: no concept probe set (the datamodule has none); set it "
                                  f"to a Broden folder or use datamodule=shapes")
        loader = self.collated(probe, P.model_device(module))

        def build():
            names = self.layer_names(module) + [n for n in self._shared_layers if n not in self.layer_names(module)]
            points = P.resolve(module, names, option=self.option("layers"))
            return ProbePass.build(module, points, loader, units=self._shared_units, max_mb=self.cache_mb,
                                   progress=lambda it, desc: self.progress(it, desc))
        shared = self.memo(epoch, "probe_pass", build)
        return shared if shared is not None else loader

    def _dissect(self, trainer, module, names: list[str], epoch: int) -> "OrderedDict[str, DissectionResult]":
        return dissect(module, names, self.probe_batches(trainer, module, epoch), quantile=self.quantile,
                       iou_threshold=self.iou_threshold, top_n=self.top_images, cache_mb=self.cache_mb,
                       progress=lambda it, desc: self.progress(it, desc), option=self.option("layers"))

    # ----- the run ----------------------------------------------------------------------------------------------
    def run(self, trainer, module, epoch):
        probe = self._probe(trainer, module)
        if probe is None:  # used without trainer.fit's setup (validate switches the callback off instead)
            if not self._warned:
                log.warning("dissection skipped: %s has no concept probe set; set %s=<Broden folder> or use "
                            "datamodule=shapes", type(getattr(trainer, "datamodule", None)).__name__,
                            self.option("probe"))
                self._warned = True
            return {}
        results = self.dissections(trainer, module, epoch)
        self.results, self.results_epoch = results, epoch
        self.num_runs += 1
        if self.is_rank_zero:
            self.write_outputs(trainer, module, results, probe, epoch)
        metrics = {}
        for i, (layer, res) in enumerate(results.items()):
            s = res.summary()
            if i == 0:
                metrics.update(s)
            if len(results) > 1:
                metrics.update({f"{layer}/{k}": v for k, v in s.items()})
        return metrics

    def write_outputs(self, trainer, module, results, probe, epoch):
        out = self.epoch_dir(trainer, epoch)
        DissectionEpoch(results, epoch).save(out / "dissection.json")
        render = self.render_due(trainer, self.render_every_n_epochs)
        images = []
        for layer, res in results.items():
            res.write_csv(out / f"{_safe(layer)}.csv")
            rows = [[r["unit"], r["category"], r["label"], round(r["score"], 5), r["interpretable"]]
                    for r in res.labels()]
            self.log_table(trainer, f"{_safe(layer)}/units", ["unit", "category", "label", "score", "interpretable"],
                           rows)
            if render:
                images.append(render_summary(res, out / f"{_safe(layer)}_summary.png", f"{layer}, epoch {epoch}"))
                if self.gallery_units > 0:
                    images.append(render_gallery(module, res, probe, out / f"{_safe(layer)}_gallery.png",
                                                 self.gallery_units, self.top_images))
        if images:
            self.log_images(trainer, "summary", images)



def _safe(name: str) -> str:
    return name.replace("/", "_")
