"""Network dissection speed.

1. Dissection wall time / one plain forward pass over the same probe images (both interleaved, median and min-max
   of the per-round ratio): resnet18 layer4, 200 images at 224 px, 112x112 masks (synthetic Broden items held in
   memory: 4 label maps, 25 concepts, one image-level label; the real path also decodes images and masks from disk,
   which this does not time). Target <= 1.5. NetDissect-Lite is not installable from a registry: no ratio of it.
2. Per-epoch callback time (every interpretation callback of callbacks=default that applies) / training epoch time
   in the default config (`python train.py`: ProtoPNet on shapes). Target <= 0.1.

    python benchmarks/bench_dissection.py [--images 200] [--skip-default] [--skip-resnet]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import compose, timeit

import torch
from torch.utils.data import DataLoader, Dataset


class SyntheticBroden(Dataset):
    """Random images with blob-shaped label maps: enough to exercise every code path at Broden's mask size."""
    concept_names = ["-"] + [f"c{i}" for i in range(1, 26)]
    concept_categories = [""] + ["object"] * 8 + ["part"] * 6 + ["color"] * 6 + ["texture"] * 4 + ["scene"]
    category_names = ["object", "part", "color", "texture", "scene"]

    def __init__(self, n=200, size=224, seg=112, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        coarse = torch.randint(0, 9, (n, 4, seg // 16, seg // 16), generator=g)
        offsets = torch.tensor([0, 6, 12, 18]).view(1, 4, 1, 1)
        maps = torch.where(coarse > 0, coarse.clamp(max=6) + offsets, torch.zeros_like(coarse))
        self.seg = torch.nn.functional.interpolate(maps.float(), size=(seg, seg), mode="nearest").long()
        self.labels = torch.zeros(n, 26, dtype=torch.bool)
        self.labels[:, 25] = torch.rand(n, generator=g) < 0.5
        self.seg_size = (seg, seg)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "seg": self.seg[i], "image_labels": self.labels[i], "index": i}


def bench_resnet(n_images: int, batch_size: int, repeat: int = 3):
    from algorithms.dissection import dissect
    from models.cnn import CNNClassifier
    torch.manual_seed(0)
    model = CNNClassifier(num_classes=10, channels=3, image_size=224, backbone="resnet18").eval()
    probe = SyntheticBroden(n_images)
    loader = DataLoader(probe, batch_size=batch_size)

    @torch.no_grad()
    def forward():
        for batch in loader:
            model(batch["image"])

    # interleaved rounds: the machine is shared, and load bursts would otherwise hit one side only
    forward()
    rounds = []
    for _ in range(repeat):
        f = timeit(forward, repeat=1, warmup=0)
        rounds.append((f, timeit(lambda: dissect(model, ["backbone.layer4"], loader), repeat=1, warmup=0)))
    ratios = sorted(d / f for f, d in rounds)
    t_forward, t_dissect = statistics.median(f for f, _ in rounds), statistics.median(d for _, d in rounds)
    res = dissect(model, ["backbone.layer4"], loader)["backbone.layer4"]
    print(f"resnet18 layer4, {n_images} images 224px, masks 112x112, {res.num_units} units, "
          f"{len(probe.concept_names) - 1} concepts, {torch.get_num_threads()} threads")
    print(f"  forward pass      {t_forward:8.2f} s")
    print(f"  dissection        {t_dissect:8.2f} s")
    print(f"  ratio dissection / forward = {statistics.median(ratios):.2f} (min-max {ratios[0]:.2f}-{ratios[-1]:.2f}, "
          f"{len(ratios)} interleaved rounds; target <= 1.5)")
    return statistics.median(ratios)


def bench_default_run(epochs: int):
    import hydra
    import pytorch_lightning as pl
    from omegaconf import open_dict

    from callbacks.base import InterpretationCallback
    from pipeline.training import instantiate_callbacks

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.start, self.epoch = {}, {}

        def on_train_epoch_start(self, trainer, pl_module):
            self.start[trainer.current_epoch] = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # listed first: runs before the interpretation callbacks
            self.epoch[trainer.current_epoch] = time.perf_counter() - self.start[trainer.current_epoch]

    with tempfile.TemporaryDirectory() as out:
        cfg = compose(["logger=none"] + ([f"trainer.max_epochs={epochs}"] if epochs else []), output_dir=out)
        epochs = cfg.trainer.max_epochs
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False
        pl.seed_everything(0, verbose=False)
        dm = hydra.utils.instantiate(cfg.datamodule)
        model = hydra.utils.instantiate(cfg.model)
        callbacks = instantiate_callbacks(cfg.callbacks)  # the group also holds flags (interpretation: true)
        timer = EpochTimer()
        spent: dict[str, dict[int, float]] = {}
        for cb in callbacks:
            if isinstance(cb, InterpretationCallback):
                def timed(trainer, module, _cb=cb, _run=cb.execute):
                    t = time.perf_counter()
                    out = _run(trainer, module)
                    spent.setdefault(_cb.name, {})[trainer.current_epoch] = time.perf_counter() - t
                    return out
                cb.execute = timed
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer] + callbacks, logger=False)
        trainer.fit(model, datamodule=dm)
    choice = type(model).__name__
    print(f"default run ({choice} on shapes, callbacks=default: every interpretation callback that applies), "
          f"{epochs} epochs:")
    total_cb, total_epoch = 0.0, 0.0
    for e in sorted(timer.epoch):
        cb = sum(s.get(e, 0.0) for s in spent.values())
        parts = ", ".join(f"{k} {s[e]:.2f}s" for k, s in spent.items() if e in s)
        print(f"  epoch {e}: training+validation {timer.epoch[e]:.2f} s; callbacks {cb:.2f} s ({parts or 'none'}); "
              f"ratio {cb / timer.epoch[e]:.3f}")
        total_cb += cb
        total_epoch += timer.epoch[e]
    runs = [e for e in timer.epoch if any(e in s for s in spent.values())]
    worst = max((sum(s.get(e, 0.0) for s in spent.values()) / timer.epoch[e] for e in runs), default=0.0)
    amortised = total_cb / total_epoch
    print(f"  worst single epoch: ratio {worst:.3f}; per epoch on average (callback time / training time over the "
          f"run) {amortised:.3f}   (target <= 0.1) {'OK' if amortised <= 0.1 else 'ABOVE TARGET'}")
    return amortised


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: the default model's own schedule (ProtoPNet: 14 epochs, about 4 minutes)")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-default", action="store_true")
    args = parser.parse_args()
    if not args.skip_resnet:
        bench_resnet(args.images, args.batch_size)
    if not args.skip_default:
        bench_default_run(args.epochs)


if __name__ == "__main__":
    main()
