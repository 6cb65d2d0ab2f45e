"""Training throughput through the framework with the model's weights channels-last (`channels_last=true`, the
default) against PyTorch's default NCHW layout (`channels_last=false`): the same Trainer train.py builds
(bench_train_throughput.Sides), the same seed and data, one epoch of each layout alternated, one warm-up pair not
counted. Ratio: NCHW seconds / channels-last seconds per epoch (> 1: channels-last is faster), median and min-max.

    python benchmarks/bench_memory_format.py [--pairs 5] [--batches 20] [hydra overrides, e.g. model=cnn]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_train_throughput import EpochClock, Sides
from common import Spread, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5, help="timed (NCHW, channels-last) epoch pairs after a warm one")
    parser.add_argument("--batches", type=int, default=20, help="batches per epoch (0: the whole training split)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="hydra overrides; default: the default model (ProtoPNet, joint phase) on shapes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        sides = {layout: Sides([*args.overrides, f"channels_last={layout}"], Path(out) / layout, args.batches or None)
                 for layout in ("false", "true")}
        clocks = {layout: EpochClock() for layout in sides}
        for _ in range(args.pairs + 1):
            for layout, side in sides.items():
                side.framework_epoch(clocks[layout])
    nchw, nhwc = (clocks[k].times[1:] for k in ("false", "true"))
    wall = Spread(a[0] / b[0] for a, b in zip(nchw, nhwc))
    cpu = Spread(a[1] / b[1] for a, b in zip(nchw, nhwc))
    n = sides["true"].images
    print(f"model={sides['true'].cfg.model._target_} images/epoch={n} pairs={len(wall)} (alternated)")
    print(f"NCHW / channels-last seconds per epoch: wall {wall}, process CPU {cpu}")
    result("memory_format", wall, vs="NCHW epoch / channels-last epoch (> 1: channels-last faster)",
           cpu_ratio=cpu.median, nchw_img_s=n / Spread(t[0] for t in nchw).median,
           channels_last_img_s=n / Spread(t[0] for t in nhwc).median, pairs=len(wall))


if __name__ == "__main__":
    main()
