"""Where a training batch's time goes, framework epoch against plain epoch (the sides of bench_train_throughput.py):
cProfile on the main thread's CPU clock (time.thread_time, so that waiting for a core on a loaded machine does not
count), plus the CPU of the process's other threads (the progress bar's refresh thread). cProfile adds a cost per
Python call, so the Lightning rows are inflated next to the torch rows; use it to rank, and the benchmark to judge.

    python benchmarks/profile_train_throughput.py [--epochs 2] [--batches 10] [hydra overrides, e.g. model=cnn]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from bench_train_throughput import PROTOPNET_JOINT, PlainLoop
from common import compose

import hydra
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

#: row -> (file path fragment, function name): the cumulative main-thread CPU of those functions
ROWS = {
    "data: loader, decoding, augmentation, collation": ("torch/utils/data/dataloader.py", "__next__"),
    "forward + loss (model_step)": ("models/", "model_step"),
    "backward": ("torch/_tensor.py", "backward"),
    "optimiser step (Adam)": ("torch/optim/adam.py", "step"),
    "self.log calls": ("pytorch_lightning/core/module.py", "log"),
    "train_acc update (torchmetrics)": ("torchmetrics/metric.py", "wrapped_func"),
    "non-finite loss check": ("models/base.py", "check_finite"),
    "progress bar hooks": ("callbacks/progress/rich_progress.py", "on_train_batch_end"),
    "logger rows (every log_every_n_steps)": ("logger_connector.py", "update_train_step_metrics"),
    "LastCheckpoint per batch (interrupt check)": ("pipeline/checkpoints.py", "on_train_batch_end"),
    "checkpoints at epoch end": ("pytorch_lightning/trainer/trainer.py", "save_checkpoint"),
}


def cumulative(stats: pstats.Stats, where: str, name: str) -> float:
    return sum(v[3] for (f, _, n), v in stats.stats.items() if n == name and where in f)


class Profiled(Checkpoint):
    """Profiles every training epoch but the first; a Checkpoint so that its epoch end comes after the writers'."""

    def __init__(self):
        self.profile, self.process = cProfile.Profile(time.thread_time), 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch:
            self.start = time.process_time()
            self.profile.enable()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch:
            self.profile.disable()
            self.process += time.process_time() - self.start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2, help="profiled epochs (after one unprofiled)")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args()
    from pipeline.training import build_loggers, build_trainer, run_callbacks

    with tempfile.TemporaryDirectory() as out:
        run_dir = Path(out)
        cfg = compose(["callbacks=minimal", "logger=csv"] + list(args.overrides), output_dir=run_dir)
        if cfg.model._target_.endswith("ProtoPNet"):
            cfg = compose(["callbacks=minimal", "logger=csv"] + PROTOPNET_JOINT + list(args.overrides),
                          output_dir=run_dir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dms = [hydra.utils.instantiate(cfg.datamodule) for _ in range(2)]
        for dm in dms:
            dm.prepare_data()
            dm.setup("fit")
        pl.seed_everything(0, verbose=False)
        model = hydra.utils.instantiate(cfg.model)
        profiled = Profiled()
        trainer = build_trainer(cfg, run_callbacks(cfg, run_dir, {}) + [profiled], build_loggers(cfg, run_dir, "p")[0],
                                max_epochs=args.epochs + 1, limit_train_batches=args.batches, limit_val_batches=0,
                                num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dms[0])

        pl.seed_everything(0, verbose=False)
        plain = PlainLoop(hydra.utils.instantiate(cfg.model), dms[1], device, args.batches)
        plain.epoch()
        profile, start = cProfile.Profile(time.thread_time), time.process_time()
        profile.enable()
        for _ in range(args.epochs):
            plain.epoch()
        profile.disable()
        plain_process = time.process_time() - start

    steps = args.epochs * args.batches
    sides = {"framework": (pstats.Stats(profiled.profile), profiled.process),
             "plain": (pstats.Stats(profile), plain_process)}
    totals = {k: max(v[3] for v in s.stats.values()) for k, (s, _) in sides.items()}
    print(f"model={cfg.model._target_} device={device}: main-thread CPU ms per training batch "
          f"({args.epochs} epochs of {args.batches} batches; cProfile)")
    print(f"| {'':48s} | framework | plain |")
    print(f"|{'-' * 50}|-----------|-------|")
    for row, (where, name) in ROWS.items():
        f, p = (1e3 * cumulative(s, where, name) / steps for s, _ in sides.values())
        print(f"| {row:48s} | {f:9.1f} | {p:5.1f} |")
    other = {k: 1e3 * max(0.0, proc - totals[k]) / steps for k, (_, proc) in sides.items()}
    print(f"| {'other threads (progress bar refresh)':48s} | {other['framework']:9.1f} | {other['plain']:5.1f} |")
    f, p = (1e3 * totals[k] / steps + other[k] for k in sides)
    print(f"| {'total':48s} | {f:9.1f} | {p:5.1f} |")
    print(f"plain/framework CPU per batch: {p / f:.3f}")


if __name__ == "__main__":
    main()
