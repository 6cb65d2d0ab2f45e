"""The interpretable CNN's location instability and part interpretability (algorithms/icnn_metrics.py) of a probe
layer's filters, every epoch, on a probe set with part masks and landmarks (`datamodule=shapes`): the probe set is
sharded across ranks, rank 0 writes <run>/interp/icnn/epoch_NNN/icnn_metrics.json (`ICNNMetricsResult`) and
filter_peaks.png, and `interp/icnn/{location_instability, part_interpretability, live_filters}` are logged.

Applies to models with filter templates (`FilterTemplateModel`: model=icnn, either switch); `all_models=true` also
to any `Interpretable` model's probe layer (`layer=...`), so a baseline is measured the same way.
"""
from __future__ import annotations

import logging

from torch.utils.data import Subset

from algorithms.icnn_metrics import (ACTIVATION_QUANTILE, IOU_THRESHOLD, TOP_IMAGES, ICNNMetricsResult,
                                     measure_filters)
from algorithms.icnn_metrics_render import render_peak_figure
from callbacks.base import InterpretationCallback, check_fraction, check_int
from core import probe as P
from core.errors import ConfigError
from core.protocol import FilterTemplateModel, Interpretable
from datamodules.errors import DataError

log = logging.getLogger(__name__)


class ICNNMetricsCallback(InterpretationCallback):
    """Location instability and part interpretability of a layer's filters on the probe set, every epoch."""

    name = "icnn"
    config_key = "icnn_metrics"
    requires = (FilterTemplateModel,)

    def __init__(self, layer: str | None = None, all_models: bool = False, split: str = "val",
                 top_k: int = TOP_IMAGES, quantile: float = ACTIVATION_QUANTILE, iou_threshold: float = IOU_THRESHOLD,
                 max_images: int | None = None, figure_filters: int = 8, figure_images: int = 6, **kwargs):
        super().__init__(**kwargs)
        self.quantile = check_fraction(quantile, self.option("quantile"))
        # a standard deviation over the top images needs at least two of them
        self.top_k = check_int(top_k, self.option("top_k"), 2)
        self.iou_threshold = check_fraction(iou_threshold, self.option("iou_threshold"), low=0.0, high=1.0)
        self.max_images = check_int(max_images, self.option("max_images"), 1, allow_none=True)
        self.figure_filters = check_int(figure_filters, self.option("figure_filters"), 0)
        self.figure_images = check_int(figure_images, self.option("figure_images"), 0)
        self.layer, self.all_models, self.split = layer, bool(all_models), split
        self._warned = False

    def applies_to(self, module) -> bool:
        return super().applies_to(module) or (self.all_models and isinstance(module, Interpretable))

    # ----- settings --------------------------------------------------------------------------------------------
    def validate(self, trainer, module, datamodule) -> None:
        P.resolve(module, self.layer, option=self.option("layer"))
        if datamodule is None:
            return  # reported by run() through self.datamodule()
        try:
            probe = self._probe_set(datamodule)
        except (ValueError, KeyError, DataError) as err:
            raise ConfigError(f"{self.option('split')}={self.split!r}: no such probe split ({err}); use val, test or "
                              f"train") from err
        if probe is None:
            self._active = False  # one warning (in _probe_set), then off for this run

    def _probe_set(self, dm):
        """The probe set with part masks and landmarks (first max_images), or None (with one warning)."""
        ds = dm.probe_dataset(self.split) if callable(getattr(dm, "probe_dataset", None)) else None
        if ds is None or getattr(ds, "part_concept_ids", None) is None:
            if not self._warned and self.is_rank_zero:
                log.warning("%s: needs a probe set with part masks and landmarks (datamodule=shapes); %s has none, "
                            "so the icnn metrics are skipped in this run", self.option("")[:-1], type(dm).__name__)
            self._warned = True
            return None
        if self.max_images is not None and len(ds) > self.max_images:
            ds = _SubsetWithAttributes(ds, range(self.max_images))
        return ds

    # ----- the method ------------------------------------------------------------------------------------------
    def run(self, trainer, module, epoch):
        ds = self._probe_set(self.datamodule(trainer))
        if ds is None:
            return {}
        point = P.resolve_one(module, self.layer, self.option("layer"))
        measured = measure_filters(module, point, ds, self.loader(self.shard(ds)), self.top_k, self.quantile,
                                   self.iou_threshold, progress=self.progress)
        metrics = measured.metrics()
        if self.is_rank_zero:
            self.write_results(trainer, module, epoch, ds, point.name, measured)
        return metrics

    def write_results(self, trainer, module, epoch, ds, layer: str, measured) -> None:
        filter_class = None
        # assigned classes only for the filters that have templates (not for a baseline's or another layer's)
        if isinstance(module, FilterTemplateModel) and layer in list(module.template_layers):
            filter_class = module.filter_class(list(module.template_layers).index(layer)).cpu().tolist()
        result = ICNNMetricsResult.build(epoch, layer, measured, getattr(ds, "part_names", None), filter_class,
                                         self.top_k, self.quantile, self.iou_threshold)
        out = self.epoch_dir(trainer, epoch)
        result.save(out / "icnn_metrics.json")
        png = out / "filter_peaks.png"
        render_peak_figure(png, ds, measured.instability["top_index"], measured.instability["top_values"],
                           measured.peak_xy, result.filters, self.figure_filters, self.figure_images)
        self.log_images(trainer, "filter_peaks", [png] if png.is_file() else [])
        filters = result.filters
        self.log_table(trainer, "filters", list(filters[0].keys()) if filters else [],
                       [list(r.values()) for r in filters])


class _SubsetWithAttributes(Subset):
    """A Subset that still exposes the probe set's attributes (part_concept_ids, part_names, ...)."""

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
