"""The decision-tree callback (algorithms/decision_tree/: rationales, the bottom-up tree of decision modes, descent,
agreement with the class definitions). The probe set and the units' concept labels are the dissection callback's
(`depends_on`), for the layer the rationales are taken at, computed once per epoch whichever callback asks first.

Outputs in <run>/interp/decision_tree/epoch_NNN/: decision_tree.json (algorithms.decision_tree.result.
DecisionTreeResult), decision_tree.png (the top levels per class; every `render_every_n_epochs`-th epoch and after
the last), modes.csv (one row per decision mode); W&B: the
figure and the modes table; scalars interp/decision_tree/{modes, explained_d<d>, fit_d<d>, modes_d<d>,
mode_defining_share, mode_names_defining (+ _shuffled), residual}.
"""
from __future__ import annotations

import csv
import logging

from algorithms.decision_tree.rationale import SOURCES, choose_source, collect_rationales
from algorithms.decision_tree.render import render_tree
from algorithms.decision_tree.result import DecisionTreeResult
from algorithms.decision_tree.tree import Labels, build_tree, check_tree_options
from callbacks.base import InterpretationCallback, check_int
from core import distributed as D
from core.errors import ConfigError
from core.protocol import Interpretable

log = logging.getLogger(__name__)


class DecisionTreeCallback(InterpretationCallback):
    """The decision tree of the model's rationales over the dissection callback's probe set, every
    `every_n_epochs` epochs (and after the last)."""

    name = "decision_tree"
    requires = (Interpretable,)
    depends_on = ("dissection",)

    def __init__(self, layer: str | None = None, source: str = "auto", sparsity: float = 0.05,
                 mode_loss: float = 0.005, max_modes: int = 8, min_images: int = 3, max_depth: int = 3,
                 figure_depth: int = 2,
                 shuffles: int = 100, every_n_epochs: int = 1, run_on_last_epoch: bool = True, batch_size: int = 100,
                 render_every_n_epochs: int = 5, **kwargs):
        super().__init__(every_n_epochs=every_n_epochs, run_on_last_epoch=run_on_last_epoch, batch_size=batch_size,
                         **kwargs)
        self.layer, self.source = layer, source
        self.sparsity, self.mode_loss, self.max_modes, self.max_depth = sparsity, mode_loss, max_modes, max_depth
        self.figure_depth, self.shuffles, self.min_images = figure_depth, shuffles, min_images
        self.render_every_n_epochs = render_every_n_epochs
        self.check_settings()
        self.result: DecisionTreeResult | None = None
        self._said_off = False

    def check_settings(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"{self.option('source')}={self.source!r}: choose one of {', '.join(SOURCES)}")
        check_tree_options(self.sparsity, self.mode_loss, self.max_modes, self.max_depth,
                           prefix=self.option("")[:-1] + ".", min_images=self.min_images)
        self.figure_depth = check_int(self.figure_depth, self.option("figure_depth"), 1)
        self.shuffles = check_int(self.shuffles, self.option("shuffles"), 0)
        self.render_every_n_epochs = check_int(self.render_every_n_epochs, self.option("render_every_n_epochs"), 1)
        if self.figure_depth > self.max_depth:
            raise ConfigError(f"{self.option('figure_depth')}={self.figure_depth}: at most "
                              f"{self.option('max_depth')}={self.max_depth} (the tree is kept to that depth)")
        if self.layer is not None and not (isinstance(self.layer, str) and self.layer):
            raise ConfigError(f"{self.option('layer')}={self.layer!r}: give one probe layer name (or null)")

    def validate(self, trainer, module, datamodule) -> None:
        self.check_settings()
        source, _ = choose_source(module, self.layer, self.source, option=self.option("source"))
        dissection = self.provider(trainer, "dissection")
        if source == "unit_head":
            # the exact rationales read unit_contributions' output from dissection's probe pass of each epoch
            dissection.share_probe_pass(units=True)
        if dissection.probe_dataset(trainer) is None:
            if D.is_rank_zero() and not self._said_off:
                log.info("%s: off for this run (no concept probe set)", self.option("")[:-1])
            self._said_off = True
            self._active = False

    def run(self, trainer, module, epoch):
        dissection_cb = self.provider(trainer, "dissection")
        probe = dissection_cb.probe_dataset(trainer)
        source, layer = choose_source(module, self.layer, self.source, option=self.option("source"))
        # the unit-head form reads the epoch's probe pass (the same shard and batches as a loader of its own)
        batches = (dissection_cb.probe_batches(trainer, module, epoch) if source == "unit_head"
                   else self.loader(self.shard(probe)))
        rat = collect_rationales(module, batches, layer, source, option=self.option("source"))
        dissection = dissection_cb.result(trainer, module, epoch, rat.layer)
        dm = getattr(trainer, "datamodule", None)
        names = getattr(dm, "class_names", None)
        result = build_tree(rat, self.sparsity, self.mode_loss, self.max_modes, self.min_images, self.max_depth,
                            labels=Labels.from_dissection(dissection, getattr(probe, "class_concepts", None)),
                            class_names=names, num_classes=getattr(module, "num_classes", None),
                            shuffles=self.shuffles)
        result.epoch = epoch
        self.result = result
        if self.is_rank_zero:
            self.write_outputs(trainer, result, epoch)
        return result.metrics

    def write_outputs(self, trainer, result: DecisionTreeResult, epoch: int):
        out = self.epoch_dir(trainer, epoch)
        result.save(out / "decision_tree.json")
        # the figure is most of this callback's cost (docs/decision_tree.md): drawn on main's render schedule
        if self.render_due(trainer, self.render_every_n_epochs):
            figure = render_tree(result, out / "decision_tree.png", depth=self.figure_depth)
            self.log_images(trainer, "tree", [figure], [f"epoch {epoch}"])
        columns = ["class", "mode", "images", "loss", "concepts", "defining_share"]
        rows = []
        for k, root in enumerate(result.roots):
            for m in result.modes(k):
                n = result.nodes[m]
                rows.append([result.class_names[k], m, n.num_images, round(n.loss, 4), n.terms(0.05),
                             None if n.defining_share is None else round(n.defining_share, 4)])
        with open(out / "modes.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
        self.log_table(trainer, "modes", columns, rows)
