"""Where a training batch's time goes, framework epoch against plain epoch (the sides of bench_train_throughput.py,
alternated the same way): cProfile on the main thread's CPU clock (time.thread_time, so that waiting for a core on a
loaded machine does not count), plus the CPU of the process's other threads (the progress bar's refresh thread).
cProfile adds a cost per Python call, so the Lightning rows are inflated next to the torch rows; use it to rank, and
the benchmark to judge.

    python benchmarks/profile_train_throughput.py [--pairs 3] [--batches 10] [hydra overrides, e.g. model=cnn]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from bench_train_throughput import Sides

from pytorch_lightning.callbacks import Checkpoint

#: row -> (file path fragment, function name or names): the cumulative main-thread CPU of those functions
ROWS = {
    "data: loader, decoding, augmentation, collation": ("torch/utils/data/dataloader.py", "__next__"),
    "forward + loss (model_step)": ("models/", "model_step"),
    "backward": ("torch/_tensor.py", "backward"),
    # the update itself: Lightning's automatic optimisation runs forward and backward inside optimizer.step(closure)
    "optimiser update (Adam)": ("torch/optim/adam.py", ("_single_tensor_adam", "_multi_tensor_adam", "_fused_adam")),
    "self.log calls": ("pytorch_lightning/core/module.py", "log"),
    "train_acc update (torchmetrics)": ("torchmetrics/metric.py", "wrapped_func"),
    "non-finite loss check": ("models/base.py", "check_finite"),
    "progress bar hooks": ("callbacks/progress/rich_progress.py", "on_train_batch_end"),
    "logger rows (every log_every_n_steps)": ("logger_connector.py", "update_train_step_metrics"),
    "LastCheckpoint per batch (interrupt check)": ("pipeline/checkpoints.py", "on_train_batch_end"),
    "checkpoints at epoch end": ("pytorch_lightning/trainer/trainer.py", "save_checkpoint"),
}


def cumulative(stats: pstats.Stats, where: str, names: str | tuple[str, ...]) -> float:
    names = (names,) if isinstance(names, str) else names
    return sum(v[3] for (f, _, n), v in stats.stats.items() if n in names and where in f)


class Profiled(Checkpoint):
    """Profiles training epochs and adds up their main-thread and process CPU seconds; a Checkpoint, so that its
    epoch end comes after the checkpoint writers'."""

    def __init__(self):
        self.profile, self.thread, self.process, self.on = cProfile.Profile(time.thread_time), 0.0, 0.0, False

    def on_train_epoch_start(self, trainer, pl_module):
        if self.on:
            self.start = time.thread_time(), time.process_time()
            self.profile.enable()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.on:
            self.profile.disable()
            self.thread += time.thread_time() - self.start[0]
            self.process += time.process_time() - self.start[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3, help="profiled (framework, plain) epoch pairs after a warm one")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        sides = Sides(list(args.overrides), Path(out), args.batches)
        framework, plain = Profiled(), Profiled()
        for i in range(args.pairs + 1):
            framework.on = plain.on = i > 0
            sides.framework_epoch(framework)
            plain.on_train_epoch_start(None, None)
            sides.plain.epoch()
            plain.on_train_epoch_end(None, None)

    stats = {side: pstats.Stats(side.profile) for side in (framework, plain)}
    table = {row: [cumulative(stats[side], where, name) for side in stats] for row, (where, name) in ROWS.items()}
    table["the rest (Lightning's loop, hooks, wrappers)"] = [
        side.thread - sum(cells[i] for cells in table.values()) for i, side in enumerate(stats)]
    table["main thread in all"] = [side.thread for side in stats]
    table["other threads (progress bar refresh)"] = [side.process - side.thread for side in stats]
    steps = args.pairs * args.batches
    print(f"model={sides.cfg.model._target_} device={sides.device}: main-thread CPU ms per training batch "
          f"({args.pairs} alternated pairs of {args.batches}-batch epochs; cProfile)")
    print(f"| {'':48s} | framework | plain |")
    print(f"|{'-' * 50}|-----------|-------|")
    for row, (f, p) in table.items():
        print(f"| {row:48s} | {1e3 * f / steps:9.1f} | {1e3 * p / steps:5.1f} |")
    print(f"plain/framework process CPU per batch: {plain.process / framework.process:.3f}")


if __name__ == "__main__":
    main()
