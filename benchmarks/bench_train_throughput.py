"""Training throughput of the default model through the framework (Lightning Trainer, metrics, logging, progress
bar) versus a plain PyTorch loop over the same model and the same data loader. Target: ratio >= 0.9.

    python benchmarks/bench_train_throughput.py [--epochs 3] [hydra overrides, e.g. model=cnn]

The plain loop uses the model's own loss (model_step) and the optimiser the framework steps (ProtoPNet: its joint
phase, which the default model is benchmarked in).
"""
from __future__ import annotations

import argparse
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


def plain_loop(model, loader, epochs: int, device) -> list[float]:
    """The same model, loss (model_step: every term of the model's objective) and optimiser, without Lightning."""
    model.to(device).train()
    if hasattr(model, "apply_phase"):  # ProtoPNet: the joint phase's trainable groups
        model.apply_phase("joint")
    optimizer = plain_optimizer(model)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = model.model_step((x, y), "train")[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - t)
    return times


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
    plain = plain_loop(hydra.utils.instantiate(cfg.model), dm.train_dataloader(), args.epochs, device)

    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[timer], enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(hydra.utils.instantiate(cfg.model), datamodule=dm)

    # the first epoch of each warms caches and allocators; compare the best of the rest
    plain_ips = n / min(plain[1:] or plain)
    fw_ips = n / min(timer.times[1:] or timer.times)
    print(f"device={device} model={cfg.model._target_} train images/epoch={n} epochs={args.epochs}")
    print(f"plain PyTorch loop : {plain_ips:8.1f} images/s")
    print(f"framework (Trainer): {fw_ips:8.1f} images/s")
    print(f"ratio framework/plain = {fw_ips / plain_ips:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
