"""CapsNet training throughput: images/s at batch 64, 28x28x1, 10 classes, 3 routing iterations, reconstruction on
(the full training step: shift augmentation, forward, margin + reconstruction loss, backward, Adam step).

No ratio to a constant: the public implementations are not installable from a registry and an images/s figure
from another machine (or another load) is not comparable. Run: `python3 benchmarks/bench_capsnet.py [--steps N]
[--threads T]`. Other processes slow the numbers; the median and the min-max of the step times are reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.capsnet import CapsNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CapsNet(num_classes=10, channels=1, image_size=28, routing_iterations=args.iterations,
                    reconstruction=True, shift_pixels=2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        loss, _, _, _ = model.model_step((x, y), "train")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    ips = args.batch / med
    print(f"capsnet train step: batch {args.batch}, {args.iterations} routing iterations, reconstruction on, "
          f"{torch.get_num_threads()} threads")
    print(f"median step {med * 1000:.0f} ms (min-max {min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms) -> "
          f"{ips:.1f} images/s")
    # CPU seconds per step do not grow when other processes take the cores; images per CPU-second times the thread
    # count is what an idle machine would give at perfect parallel efficiency (an upper bound, printed for context)
    cpu_med = statistics.median(cpu)
    print(f"median CPU time per step {cpu_med * 1000:.0f} ms -> {args.batch / cpu_med:.1f} images per CPU-second "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
