"""Training throughput of the default model through the framework (Lightning Trainer, metrics, logging, progress
bar) versus a plain PyTorch loop over the same model and the same data loader, epochs alternated (one
framework epoch, one plain epoch, ...). Target: ratio >= 0.95.

    python benchmarks/bench_train_throughput.py [--epochs 3] [hydra overrides, e.g. model=cnn]

The plain loop uses the model's own loss (model_step) and the optimiser the framework steps (ProtoPNet: its joint
phase, which the default model is benchmarked in).
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import compose

import hydra
import pytorch_lightning as pl
import torch


class EpochTimer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self.t)


def plain_optimizer(model):
    """The optimiser the framework steps in a training epoch: the single one, or ProtoPNet's joint-phase one."""
    configured = model.configure_optimizers()
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, tuple):  # (optimizers, schedulers)
        configured = configured[0]
    if isinstance(configured, (list, tuple)):
        phase = getattr(model, "phase", None)
        if phase is not None:  # one optimiser per phase, in PHASES order
            from models.protopnet import PHASES
            return configured[PHASES.index(phase)]
        return configured[0]
    return configured


class PlainLoop(pl.Callback):
    """The same model, loss (model_step: every term of the model's objective) and optimiser, without Lightning: one
    plain epoch after each framework epoch (after EpochTimer has stopped its clock), so that both alternate and load
    from other processes hits both alike."""

    def __init__(self, model, loader, device):
        self.model, self.loader, self.device = model.to(device).train(), loader, device
        if hasattr(self.model, "apply_phase"):  # ProtoPNet: the joint phase's trainable groups
            self.model.apply_phase("joint")
        self.optimizer = plain_optimizer(self.model)
        self.times = []

    def on_train_epoch_end(self, trainer, pl_module):
        t = time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.model.model_step((x, y), "train")[0]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.times.append(time.perf_counter() - t)


#: ProtoPNet trains its joint phase in every timed epoch (no warm epoch, no push): the phase that dominates its run
PROTOPNET_JOINT = ["model.schedule.warm_epochs=0", "model.schedule.push=false", "model.schedule.final_push=false"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", default=[],
                        help="hydra overrides; default: the default model (ProtoPNet, joint phase) on shapes")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    if cfg.model._target_.endswith("ProtoPNet"):
        cfg = compose(list(args.overrides) + PROTOPNET_JOINT)
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.prepare_data()
    dm.setup("fit")
    n = len(dm.train_dataloader().dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    pl.seed_everything(0, verbose=False)
    plain = PlainLoop(hydra.utils.instantiate(cfg.model), dm.train_dataloader(), device)
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[timer, plain], enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(hydra.utils.instantiate(cfg.model), datamodule=dm)

    # alternated epochs (framework, plain, framework, ...); the first pair warms caches and allocators
    pairs = list(zip(timer.times, plain.times))[1:] or list(zip(timer.times, plain.times))
    ratios = sorted(p / f for f, p in pairs)   # framework images/s over plain images/s
    print(f"device={device} model={cfg.model._target_} train images/epoch={n} epochs={args.epochs} (alternated)")
    print(f"plain PyTorch loop : {n / statistics.median(p for _, p in pairs):8.1f} images/s (median)")
    print(f"framework (Trainer): {n / statistics.median(f for f, _ in pairs):8.1f} images/s (median)")
    print(f"ratio framework/plain = {statistics.median(ratios):.3f} (min-max {ratios[0]:.3f}-{ratios[-1]:.3f} over "
          f"{len(ratios)} alternated pairs; target >= 0.95)")

if __name__ == "__main__":
    main()
