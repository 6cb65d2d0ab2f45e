"""Capsule-dimension perturbations and coupling heat maps (algorithms/capsules.py) for a few fixed test images of a
`CapsuleModel`, every epoch, into <run>/interp/capsules/epoch_NNN/ (perturbation_NN.png, coupling_heatmap.png,
capsules.json: `CapsulesResult`) and W&B (interp/capsules/...)."""
from __future__ import annotations

import torch

from algorithms.capsules import analyse_capsules
from algorithms.capsules_render import render_coupling_heatmap, render_perturbations
from callbacks.base import InterpretationCallback, check_int
from core.errors import ConfigError
from core.probe import model_device
from core.protocol import CapsuleModel


class CapsulesCallback(InterpretationCallback):
    """Capsule dimension perturbations and coupling heat maps for `num_images` fixed test images."""

    name = "capsules"
    requires = (CapsuleModel,)

    def __init__(self, num_images: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_images = check_int(num_images, self.option("num_images"), 1)

    def validate(self, trainer, module, datamodule) -> None:
        missing = [n for n in ("vis_dataset", "normalize") if not callable(getattr(datamodule, n, None))]
        if datamodule is None or missing:
            raise ConfigError(f"{self.option('')[:-1]} shows test images: the datamodule needs vis_dataset() and "
                              f"normalize() ({type(datamodule).__name__} lacks {', '.join(missing)}); use a "
                              f"datamodule of datamodules/ or {self.option('enabled')}=false")

    def images(self, trainer, module) -> tuple[torch.Tensor, torch.Tensor]:
        dm = self.datamodule(trainer)
        try:
            ds = dm.vis_dataset("test")
        except Exception:  # test split not prepared during fit on some datamodules
            ds = dm.vis_dataset("val")
        items = [ds[i] for i in range(min(self.num_images, len(ds)))]
        raw = torch.stack([torch.as_tensor(it[0]) for it in items])
        labels = torch.as_tensor([int(it[1]) for it in items])
        return dm.normalize(raw).to(model_device(module)), labels

    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        x, labels = self.images(trainer, module)
        analysis = analyse_capsules(module, x)
        result = analysis.result(labels.tolist(), epoch)
        if not self.is_rank_zero:
            return result.metrics
        out_dir = self.epoch_dir(trainer, epoch)
        names = getattr(self.datamodule(trainer), "class_names", None)
        name = (lambda c: names[c] if names and c < len(names) else str(c))
        paths, captions = render_perturbations(analysis, labels, out_dir, name)
        heat = render_coupling_heatmap(analysis, labels, out_dir / "coupling_heatmap.png", name)
        result.save(out_dir / "capsules.json")
        self.log_images(trainer, "perturbation", paths, captions)
        self.log_images(trainer, "coupling_heatmap", [heat])
        return result.metrics
