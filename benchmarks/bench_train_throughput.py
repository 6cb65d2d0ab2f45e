"""Training throughput through the framework versus a plain PyTorch loop over the same model and the same data path,
epochs alternated: one framework epoch, one plain epoch, ... Target: ratio (framework images/s over plain images/s)
>= 0.95.

    python benchmarks/bench_train_throughput.py [--pairs 5] [--batches 20] [hydra overrides, e.g. model=cnn]

The framework side is the Trainer train.py builds (pipeline.training.run_callbacks + build_trainer: the trainer
group, callbacks=minimal's checkpoint, last.ckpt after every epoch, the logger group; logger=csv unless an override
says otherwise) with validation off; each framework epoch is timed from its start to the end of its last epoch-end
hook (checkpoint writing included). The plain side: the same model class, its own loss (model_step: every term of
the objective), the optimiser the framework steps (ProtoPNet: the joint phase's), a data module built from the same
config (same files, decoding, augmentation and batch size), no logging, no checkpoint. One warm-up pair is not
counted. Each pair gives a ratio; the summary is their median and min-max, so that load from other processes, which
comes and goes, hits both sides of a pair alike. Process CPU seconds are compared the same way (cpu_ratio): on a
shared machine they move less with the load than wall time does.

The last line: `RESULT train_throughput ratio=.. spread=..-.. plain_img_s=.. framework_img_s=.. cpu_ratio=..
pairs=..` (medians; images/s from wall time).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import compose

import hydra
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

#: ProtoPNet trains its joint phase in every timed epoch (no warm epoch, no push): the phase that dominates its run
PROTOPNET_JOINT = ["model.schedule.warm_epochs=0", "model.schedule.push=false", "model.schedule.final_push=false"]


def clocks() -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


class EpochClock(Checkpoint):
    """Wall and process-CPU seconds of each training epoch. A Checkpoint, so Lightning runs its epoch-end hook after
    every other one, the checkpoint writers' included."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = clocks()

    def on_train_epoch_end(self, trainer, pl_module):
        end = clocks()
        self.times.append((end[0] - self.start[0], end[1] - self.start[1]))


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


class PlainLoop:
    """What a researcher would write without the framework: the model's loss, zero_grad, backward, step."""

    def __init__(self, model, datamodule, device, batches: int | None):
        self.model, self.datamodule, self.device, self.batches = model.to(device).train(), datamodule, device, batches
        if hasattr(self.model, "apply_phase"):  # ProtoPNet: the joint phase's trainable groups
            self.model.apply_phase("joint")
        self.optimizer = plain_optimizer(self.model)

    def epoch(self) -> tuple[float, float]:
        start = clocks()
        for i, (x, y) in enumerate(self.datamodule.train_dataloader()):
            if self.batches is not None and i >= self.batches:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.model.model_step((x, y), "train")[0]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        end = clocks()
        return end[0] - start[0], end[1] - start[1]


class Sides:
    """The two sides of the comparison, built from one config: `framework_epoch(*callbacks)` trains one epoch
    through the Trainer train.py builds (one fit per epoch, so that a plain epoch can run between two of them
    outside Lightning, its progress bar thread included; per-fit setup is outside the epoch, as in a real run) and
    `plain.epoch()` one plain epoch."""

    def __init__(self, overrides: list[str], run_dir: Path, batches: int | None):
        from pipeline.training import build_loggers
        base = ["callbacks=minimal", "logger=csv"]
        cfg = compose(base + overrides, output_dir=run_dir)
        if cfg.model._target_.endswith("ProtoPNet"):
            cfg = compose(base + PROTOPNET_JOINT + overrides, output_dir=run_dir)
        self.cfg, self.run_dir, self.batches = cfg, run_dir, batches
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.datamodules = [hydra.utils.instantiate(cfg.datamodule) for _ in range(2)]
        for dm in self.datamodules:
            dm.prepare_data()
            dm.setup("fit")
        from pipeline.training import apply_memory_format
        models = []
        for _ in range(2):
            pl.seed_everything(0, verbose=False)
            # both sides in the layout train.py gives the model (config `channels_last`)
            models.append(apply_memory_format(hydra.utils.instantiate(cfg.model), cfg.get("channels_last", False)))
        self.model = models[0]
        self.plain = PlainLoop(models[1], self.datamodules[1], self.device, batches)
        self.loggers, _ = build_loggers(cfg, run_dir, "throughput")
        n = len(self.datamodules[0].train_dataloader()) if batches is None else batches
        self.images = n * cfg.datamodule.batch_size

    def framework_epoch(self, *callbacks) -> None:
        from pipeline.training import build_trainer, run_callbacks
        trainer = build_trainer(self.cfg, run_callbacks(self.cfg, self.run_dir, {}) + list(callbacks), self.loggers,
                                max_epochs=1, limit_train_batches=self.batches or 1.0, limit_val_batches=0,
                                num_sanity_val_steps=0)
        trainer.fit(self.model, datamodule=self.datamodules[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5, help="timed (framework, plain) epoch pairs after a warm one")
    parser.add_argument("--batches", type=int, default=20, help="batches per epoch (0: the whole training split)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="hydra overrides; default: the default model (ProtoPNet, joint phase) on shapes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        sides = Sides(list(args.overrides), Path(out), args.batches or None)
        clock = EpochClock()
        framework, plain = [], []
        for _ in range(args.pairs + 1):
            sides.framework_epoch(clock)
            framework.append(clock.times[-1])
            plain.append(sides.plain.epoch())
    n, cfg, device = sides.images, sides.cfg, sides.device

    pairs = list(zip(framework, plain))[1:]  # the first pair warms caches, allocators, lazy imports
    wall = sorted(p[0] / f[0] for f, p in pairs)  # framework images/s over plain images/s = plain s / framework s
    cpu = sorted(p[1] / f[1] for f, p in pairs)
    plain_img_s = n / statistics.median(p[0] for _, p in pairs)
    framework_img_s = n / statistics.median(f[0] for f, _ in pairs)
    print(f"device={device} model={cfg.model._target_} images/epoch={n} pairs={len(pairs)} (alternated)")
    print(f"plain PyTorch loop : {plain_img_s:8.1f} images/s (median)")
    print(f"framework (Trainer): {framework_img_s:8.1f} images/s (median)")
    print(f"ratio framework/plain: wall {statistics.median(wall):.3f} (min-max {wall[0]:.3f}-{wall[-1]:.3f}), "
          f"process CPU {statistics.median(cpu):.3f} (min-max {cpu[0]:.3f}-{cpu[-1]:.3f}); target >= 0.95")
    print(f"RESULT train_throughput ratio={statistics.median(wall):.3f} spread={wall[0]:.3f}-{wall[-1]:.3f} "
          f"plain_img_s={plain_img_s:.1f} framework_img_s={framework_img_s:.1f} cpu_ratio={statistics.median(cpu):.3f} "
          f"pairs={len(pairs)}")


if __name__ == "__main__":
    main()
