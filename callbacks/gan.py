"""The GAN interpretation callbacks (lecture part 4), thin wrappers around algorithms/gan/: GAN dissection of a
generator layer, interventions on each concept's top units, latent directions. They apply to models that offer
`GenerativeModel` (core/protocol.py) and need its concept segmenter (`model.segmenter`); without one they switch
themselves off before training with one warning. Under DDP every rank draws the same probe latents and works on its
contiguous share of them (algorithms/gan/sampling.py shard_latents): dissection thresholds come from the gathered
per-unit top-k and its counts, the intervention pixel counts and the traversal sums are all-reduced, so every rank
returns the single-process result; rank 0 writes <run>/interp/<name>/epoch_NNN/ (typed JSON + PNG) and logs to W&B.
"""
from __future__ import annotations

import logging
from typing import Sequence

from algorithms.gan.directions import FAMILIES, directions_of, traverse
from algorithms.gan.dissection import METHODS, dissect_generator
from algorithms.gan.interventions import intervene, region_mask
from algorithms.gan.render import render_intervention, render_top_units, render_traversal
from callbacks.base import InterpretationCallback, check_fraction, check_int
from core import probe as P
from core.errors import ConfigError
from core.protocol import GenerativeModel

log = logging.getLogger(__name__)


class GanCallback(InterpretationCallback):
    requires = (GenerativeModel,)

    def __init__(self, every_n_epochs: int = 4, **kwargs):
        # each GAN method costs about as much as an epoch of GAN training (docs/gan.md): after every 4th epoch and
        # the last by default
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)

    def validate(self, trainer, module, datamodule) -> None:
        if getattr(module, "concept_segmenter", None) is None:
            log.warning("%s: off, model.segmenter is not set (the GAN methods measure concepts with a trained "
                        "segmenter: `python train.py model=segmenter`, then model.segmenter=<run>/checkpoints/"
                        "last.ckpt)", self.option("")[:-1])
            self._active = False

    def concept_ids(self, module, names: Sequence[str] | None) -> list[int]:
        vocab = list(module.concept_segmenter.concept_names)
        if not names:
            return list(range(1, len(vocab)))
        bad = [n for n in names if n not in vocab[1:]]
        if bad:
            raise ConfigError(f"{self.option('concepts')}: unknown {bad}; the segmenter knows {', '.join(vocab[1:])}")
        return [vocab.index(n) for n in names]


class GanDissectionCallback(GanCallback):
    """GAN dissection of `layer`; a provider for the intervention callback (`result(trainer, module, epoch)`)."""

    name = "gan_dissection"

    def __init__(self, layer: str | None = None, num_samples: int = 256, threshold: str = "quantile",
                 quantile: float = 0.01, num_figures: int = 6, seed: int = 0, batch_size: int = 64, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        self.layer = layer
        self.num_samples = check_int(num_samples, self.option("num_samples"), 8)
        if threshold not in METHODS:
            raise ConfigError(f"{self.option('threshold')}={threshold!r}: use one of {', '.join(METHODS)}")
        self.threshold = threshold
        self.quantile = check_fraction(quantile, self.option("quantile"))
        self.num_figures = check_int(num_figures, self.option("num_figures"), 0)
        self.seed = int(seed)

    def validate(self, trainer, module, datamodule) -> None:
        P.resolve(module, self.layer, self.option("layer"))     # an unknown layer name fails here, before training
        super().validate(trainer, module, datamodule)

    def result(self, trainer, module, epoch: int):
        return self.memo(epoch, "result", lambda: dissect_generator(
            module, self.layer or P.default_layer(module), self.num_samples, self.batch_size, self.seed,
            self.threshold, self.quantile, option=self.option("layer")))

    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        res = self.result(trainer, module, epoch)
        metrics = res.summary()
        if self.is_rank_zero:
            out = self.epoch_dir(trainer, epoch)
            res.save(out / "gan_dissection.json")
            res.write_csv(out / f"{res.layer}.csv")
            if self.num_figures:
                fig = render_top_units(module, res, out / "top_units.png", self.num_figures)
                self.log_images(trainer, "top_units", [fig])
            concept, score = res.best
            rows = [[u, res.concept_names[int(c)], float(s), bool(ok)]
                    for u, (c, s, ok) in enumerate(zip(concept, score, res.interpretable))]
            self.log_table(trainer, "units", ["unit", "concept", "iou", "interpretable"], rows)
        return metrics


class GanInterventionCallback(GanCallback):
    """Ablation and insertion of the top `num_units` units of each of `concepts` vs as many random units."""

    name = "gan_intervention"
    depends_on = ("gan_dissection",)

    def __init__(self, num_units: int = 20, num_samples: int = 64, random_draws: int = 3, insert_scale: float = 1.0,
                 region: Sequence[float] | None = None, concepts: Sequence[str] | None = None, seed: int = 1,
                 batch_size: int = 64, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        self.num_units = check_int(num_units, self.option("num_units"), 1)
        self.num_samples = check_int(num_samples, self.option("num_samples"), 1)
        self.random_draws = check_int(random_draws, self.option("random_draws"), 1)
        if float(insert_scale) <= 0:
            raise ConfigError(f"{self.option('insert_scale')}={insert_scale}: a positive factor of the threshold")
        self.insert_scale = float(insert_scale)
        self.region = None if region is None else [float(v) for v in region]
        try:
            region_mask((4, 4), self.region)
        except ConfigError as err:
            raise ConfigError(f"{self.option('region')}: {err}") from err
        self.concepts = list(concepts) if concepts else None
        self.seed = int(seed)

    def validate(self, trainer, module, datamodule) -> None:
        super().validate(trainer, module, datamodule)
        if self._active:
            self.concept_ids(module, self.concepts)

    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        dissection = self.provider(trainer, "gan_dissection").result(trainer, module, epoch)
        res = intervene(module, dissection, self.concept_ids(module, self.concepts), self.num_units,
                        self.num_samples, self.seed, self.random_draws, self.insert_scale, self.region,
                        self.batch_size)
        if self.is_rank_zero:
            out = self.epoch_dir(trainer, epoch)
            res.save(out / "gan_intervention.json")
            fig = render_intervention(module, dissection, res, out / "interventions.png")
            self.log_images(trainer, "interventions", [fig])
            self.log_table(trainer, "concepts", *res.table())
        return res.metrics


class GanDirectionsCallback(GanCallback):
    """SeFa directions (and random / coordinate-axis baselines) with traversals measured by the segmenter."""

    name = "gan_directions"

    def __init__(self, families: Sequence[str] = ("sefa", "random", "axes"), num_directions: int = 5,
                 alphas: Sequence[float] = (-3.0, -1.5, 0.0, 1.5, 3.0), num_samples: int = 16,
                 change_threshold: float = 0.01, seed: int = 2, batch_size: int = 64, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        bad = [f for f in families if f not in FAMILIES]
        if bad or not families:
            raise ConfigError(f"{self.option('families')}={list(families)}: use any of {', '.join(FAMILIES)}")
        self.families = list(families)
        self.num_directions = check_int(num_directions, self.option("num_directions"), 1)
        if not alphas or 0.0 not in [float(a) for a in alphas]:
            raise ConfigError(f"{self.option('alphas')}={list(alphas or [])}: include 0.0 (the unedited sample "
                              f"every change is measured from)")
        self.alphas = [float(a) for a in alphas]
        self.num_samples = check_int(num_samples, self.option("num_samples"), 1)
        self.change_threshold = check_fraction(change_threshold, self.option("change_threshold"))
        self.seed = int(seed)

    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        dirs, eig = directions_of(module, self.families, self.num_directions, self.seed)
        res = traverse(module, dirs, self.alphas, self.num_samples, self.seed, self.batch_size,
                       self.change_threshold, eig)
        if self.is_rank_zero:
            out = self.epoch_dir(trainer, epoch)
            res.save(out / "gan_directions.json")
            figs = [render_traversal(module, res, fam, out / f"traversal_{fam}.png") for fam in self.families]
            self.log_images(trainer, "traversals", figs, self.families)
            rows = [[fam, i, res.concept_names[int(res.change(fam)[i].argmax())], float(res.change(fam)[i].max()),
                     int(res.concepts_changed(fam)[i]), float(res.class_change(fam)[i])]
                    for fam in self.families for i in range(len(res.directions[fam]))]
            self.log_table(trainer, "directions", ["family", "direction", "top_concept", "change",
                                                   "concepts_changed", "class_change"], rows)
        return res.metrics
