"""ProtoPNet prototypes after every push: the gallery, "this looks like that" panels for a few test images and
prototype quality on ground-truth concept masks, in <run>/interp/prototypes/epoch_NNN/ and on W&B
(interp/prototypes/...). The methods are plain code in algorithms/prototypes.py (+ prototypes_render.py); this
callback only schedules (the end of every epoch that began with a push), shards the probe set, renders on rank 0,
writes the typed results (prototypes.json: `PrototypeRecords`, quality.json: `PrototypeQuality`) and logs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from algorithms.prototypes import (PrototypeQuality, PrototypeRecords, evidence_share, explain, mask_quality,
                                   push_statistics)
from algorithms.prototypes_render import render_explanation, render_gallery
from callbacks.base import InterpretationCallback, check_int
from core.errors import ConfigError
from datamodules.errors import DataError
from core.probe import model_device
from core.protocol import PrototypeModel

log = logging.getLogger(__name__)


class PrototypeCallback(InterpretationCallback):
    """After every push of a `PrototypeModel`: gallery + records, "this looks like that" panels, quality metrics."""

    name = "prototypes"
    requires = (PrototypeModel,)

    def __init__(self, num_explained: int = 4, top_prototypes: int = 3, purity_k: int = 10,
                 probe_split: str = "train", probe_limit: int | None = 1000, thumbnail: int = 64,
                 classes_per_page: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.num_explained = check_int(num_explained, self.option("num_explained"), 0)
        self.top_prototypes = check_int(top_prototypes, self.option("top_prototypes"), 1)
        self.purity_k = check_int(purity_k, self.option("purity_k"), 1)
        self.probe_split = probe_split
        self.probe_limit = check_int(probe_limit, self.option("probe_limit"), 1, allow_none=True)
        self.thumbnail = check_int(thumbnail, self.option("thumbnail"), 8)
        self.classes_per_page = check_int(classes_per_page, self.option("classes_per_page"), 1)

    # ----- settings --------------------------------------------------------------------------------------------
    def validate(self, trainer, module, datamodule) -> None:
        if datamodule is None:
            raise ConfigError(f"{self.option('')[:-1]} needs the run's datamodule (trainer.fit(model, datamodule=...))")
        # the push projects onto push_dataloader()'s images, the gallery shows them from vis_dataset("train"), the
        # panels explain vis_dataset("test") images normalised like the training data
        missing = [n for n in ("push_dataloader", "vis_dataset", "normalize")
                   if not callable(getattr(datamodule, n, None))]
        if missing:
            raise ConfigError(f"{self.option('')[:-1]}: {type(datamodule).__name__} has no {', '.join(missing)}() "
                              f"(needed for the push, the gallery and the explanations); use a datamodule of "
                              f"datamodules/ or turn the callback off ({self.option('enabled')}=false)")
        if self._probe(datamodule) is None and self.is_rank_zero:
            log.info("%s: %s has no concept probe set; purity and class-object hit rate are not measured",
                     self.option("")[:-1], type(datamodule).__name__)

    def _probe(self, dm):
        """The concept probe set of probe_split, or None for data without concept masks."""
        if not callable(getattr(dm, "probe_dataset", None)):
            return None
        try:
            return dm.probe_dataset(self.probe_split)
        except (ValueError, KeyError, DataError) as err:
            raise ConfigError(f"{self.option('probe_split')}={self.probe_split!r}: no such probe split ({err}); "
                              f"use train (the push set's split, needed for the hit rate), val or test") from err

    # ----- schedule: after every push ----------------------------------------------------------------------
    def should_run(self, trainer) -> bool:
        module = trainer.lightning_module
        if not isinstance(module, PrototypeModel):
            return False
        history = module.push_history
        return bool(history) and history[-1]["epoch"] == trainer.current_epoch and module.last_push is not None

    # ----- the method ------------------------------------------------------------------------------------------
    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        result = module.last_push
        dm = self.datamodule(trainer)
        class_names = list(getattr(dm, "class_names", None) or [])
        quality = PrototypeQuality.build(epoch, push_statistics(module, result), self.quality(module, dm, result),
                                         self.evidence(module, dm))
        if self.is_rank_zero:
            out = self.epoch_dir(trainer, epoch)
            self.render(trainer, module, dm, result, out, class_names)
            quality.save(out / "quality.json")
        return quality.metrics()

    def quality(self, module, dm, result) -> dict:
        """Purity and class-object hit rate on the masks of dm.probe_dataset(probe_split) (this rank's shard)."""
        probe = self._probe(dm)
        if probe is None:
            return {}
        part = probe
        if self.probe_limit is not None and len(probe) > self.probe_limit:
            part = torch.utils.data.Subset(probe, range(self.probe_limit))
        base = probe.dataset if isinstance(probe, torch.utils.data.Subset) else probe
        # push sources index vis_dataset("train"): the hit rate reads their masks from the train probe set
        return mask_quality(module, result, base, self.loader(self.shard(part)), k=self.purity_k,
                            hit_rate=self.probe_split == "train")

    def evidence(self, module, dm) -> dict[str, float]:
        """own_class_evidence_share over the validation images (this rank's shard), normalised as in training."""
        val = dm.vis_dataset("val")
        if self.probe_limit is not None and len(val) > self.probe_limit:
            val = torch.utils.data.Subset(val, range(self.probe_limit))
        batches = ((dm.normalize(x01), y) for x01, y, *_ in self.loader(self.shard(val)))
        return evidence_share(module, batches)

    def render(self, trainer, module, dm, result, out: Path, class_names: list[str]) -> None:
        train_vis = dm.vis_dataset("train")
        sources = {int(i): train_vis[int(i)][0] for i in result.image_index[result.pushed].unique().tolist()}
        PrototypeRecords.build(module.push_history[-1], result, class_names).save(out / "prototypes.json")
        pages = render_gallery(result, sources, out, class_names, self.thumbnail, self.classes_per_page)
        self.log_images(trainer, "gallery", pages)
        if self.num_explained <= 0:
            return
        test_vis = dm.vis_dataset("test")
        n = min(self.num_explained, len(test_vis))
        picks = np.linspace(0, len(test_vis) - 1, n).round().astype(int).tolist() if n else []
        items = [test_vis[i] for i in picks]
        x01 = torch.stack([it[0] for it in items])
        expl = explain(module, dm.normalize(x01).to(model_device(module)), self.top_prototypes)
        expl = {k: v.cpu() for k, v in expl.items()}
        panels = [render_explanation(x01[i], int(items[i][1]), expl, i, result, sources,
                                     out / f"this_looks_like_that_{picks[i]:05d}.png", class_names)
                  for i in range(n)]
        self.log_images(trainer, "this_looks_like_that", panels)
