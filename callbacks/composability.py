"""The concept composability + IBD callback (algorithms/composability.py, algorithms/ibd.py) for models whose decision
is a sum over units (core.protocol.UnitHead). The concept labels of the units come from the run's dissection callback
(`depends_on`), for the model's `unit_layer` (or `callbacks.composability.layer`), computed once per epoch whichever
of the two callbacks runs first; the probe set is the dissection callback's.

Outputs in <run>/interp/composability/epoch_NNN/: composability.json (algorithms.composition_result.
CompositionResult), composability.csv (one row per class: statement, precision, recall, IBD statement and residual);
a W&B table; scalars interp/composability/{completeness, concept_coverage, sparsity_units90,
nonzero_weights_per_class, agreement_precision, agreement_recall, ibd_residual}.
"""
from __future__ import annotations

import csv
import logging

from algorithms.composability import CompositionResult, compose
from callbacks.base import InterpretationCallback, check_fraction, check_int
from core import distributed as D
from core import probe as P
from core.errors import ConfigError
from core.protocol import Interpretable, UnitHead

log = logging.getLogger(__name__)


class ComposabilityCallback(InterpretationCallback):
    """Composability of the decisions over the dissection callback's probe set, every `every_n_epochs` epochs."""

    name = "composability"
    requires = (Interpretable, UnitHead)
    depends_on = ("dissection",)

    def __init__(self, layer: str | None = None, min_share: float = 0.1, evidence_share: float = 0.9,
                 ibd_terms: int = 5, every_n_epochs: int = 1, run_on_last_epoch: bool = True, batch_size: int = 100,
                 **kwargs):
        super().__init__(every_n_epochs=every_n_epochs, run_on_last_epoch=run_on_last_epoch, batch_size=batch_size,
                         **kwargs)
        self.layer, self.min_share, self.evidence_share, self.ibd_terms = layer, min_share, evidence_share, ibd_terms
        self.check_settings()
        self.result: CompositionResult | None = None
        self._said_off = False

    def check_settings(self) -> None:
        self.min_share = check_fraction(self.min_share, self.option("min_share"), inclusive_high=True)
        self.evidence_share = check_fraction(self.evidence_share, self.option("evidence_share"), inclusive_high=True)
        self.ibd_terms = check_int(self.ibd_terms, self.option("ibd_terms"), 0)
        if self.layer is not None and not (isinstance(self.layer, str) and self.layer):
            raise ConfigError(f"{self.option('layer')}={self.layer!r}: give one probe layer name (or null for the "
                              f"model's unit_layer)")

    def unit_layer(self, module) -> str:
        """The probe layer whose channels are the units of unit_contributions."""
        return self.layer or module.unit_layer

    def _layer_option(self, module) -> str:
        return self.option("layer") if self.layer else f"{type(module).__name__}.unit_layer (or {self.option('layer')})"

    def validate(self, trainer, module, datamodule) -> None:
        self.check_settings()
        layer = self.unit_layer(module)
        point = P.resolve(module, layer, option=self._layer_option(module))
        dissection = self.provider(trainer, "dissection")
        probe = dissection.probe_dataset(trainer)
        # the unit layer's maps and unit_contributions come from dissection's probe pass of each epoch
        dissection.share_probe_pass([layer], units=True)
        if probe is None:  # the dissection callback warns about it
            if D.is_rank_zero() and not self._said_off:
                log.info("%s: off for this run (no concept probe set for the dissection labels)",
                         self.option("")[:-1])
            self._said_off = True
            self._active = False
            return
        x = probe[0]["image"][None].to(P.model_device(module))
        with P.interpretation_mode(module, grad=False):
            maps = P.capture(module, None, x, points=point).acts[layer]
            units = module.unit_contributions(x)[0].shape[1]
        if maps.dim() < 2 or maps.shape[1] != units:
            raise ConfigError(f"{self._layer_option(module)}={layer!r}: its maps have {list(maps.shape)[1:]} "
                              f"(channels first) but unit_contributions has {units} units; set {self.option('layer')} "
                              f"to the probe layer whose channels are those units (valid: "
                              f"{', '.join(P.valid_names(module))})")

    def run(self, trainer, module, epoch):
        layer = self.unit_layer(module)
        dissection_cb = self.provider(trainer, "dissection")
        dissection = dissection_cb.result(trainer, module, epoch, layer)
        probe = dissection_cb.probe_dataset(trainer)
        result = compose(module, dissection_cb.probe_batches(trainer, module, epoch), dissection,
                         class_names=getattr(getattr(trainer, "datamodule", None), "class_names", None),
                         class_concepts=getattr(probe, "class_concepts", None), min_share=self.min_share,
                         evidence_share=self.evidence_share, ibd_terms=self.ibd_terms,
                         reference=probe[0]["image"], option=self._layer_option(module))
        result.epoch = epoch
        self.result = result
        if self.is_rank_zero:
            self.write_outputs(trainer, result, epoch)
        return result.metrics

    def write_outputs(self, trainer, result: CompositionResult, epoch: int):
        out = self.epoch_dir(trainer, epoch)
        result.save(out / "composability.json")
        columns = ["class", "images", "statement", "negative_share", "precision", "recall", "ibd", "ibd_residual"]
        ibd = {b.name: b for b in result.ibd}
        rows = []
        for c in result.classes:
            b = ibd.get(c.name)
            rows.append([c.name, c.num_images, c.statement(), round(c.negative_share, 4),
                         None if c.precision is None else round(c.precision, 4),
                         None if c.recall is None else round(c.recall, 4), b.statement if b else "",
                         None if b is None else round(b.residual, 4)])
        with open(out / "composability.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
        self.log_table(trainer, "classes", columns, rows)
