"""Dynamic-K head cost: forward + backward time of the Dynamic-K head divided by a linear head's on the same pooled
features (batch 256, 512 features, 365 classes, K = 5 -- the authors' Places365 / ResNet-18 setting). Target <= 1.5.

On the CPU the head runs the compiled kernel (models/csrc/dynamic_k.c); the script also times the pure-torch
selection (what runs on a GPU, for other dtypes, or without a C compiler) for comparison.

Run: `python3 benchmarks/bench_dynconn.py [--device cuda] [--repeat N]`. The ratio is the median over N interleaved
rounds (linear, then Dynamic-K) of their time ratio, so that load from other processes hits both sides of each ratio
alike; the times printed are medians too.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from common import timed_ratios, timeit  # noqa: E402  (puts the repository root on sys.path)
from models import dynk_kernel  # noqa: E402
from models.dynconn import DynamicKLinear  # noqa: E402

TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=365)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = torch.relu(torch.randn(args.batch, args.features, device=dev)).requires_grad_()
    head = DynamicKLinear(args.features, args.classes, args.k).to(dev)
    linear = torch.nn.Linear(args.features, args.classes).to(dev)
    g = torch.randn(args.batch, args.classes, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(module):
        def step():
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(g)
            sync()
        return step

    kernel = dynk_kernel.applies(x, head.weight, head.bias, args.k)
    for _ in range(3):  # warm-up: the kernel's first call builds or loads it
        run(head)()
    t_lin, ratios = timed_ratios(run(linear), {"dynk": run(head)}, repeats=args.repeat)
    ratio = ratios["dynk"]
    t_dk = ratio * t_lin
    os.environ[dynk_kernel.ENV_SWITCH] = "0"
    t_torch = timeit(run(head), repeat=max(3, args.repeat // 8), warmup=1)
    os.environ.pop(dynk_kernel.ENV_SWITCH)
    print(f"device {dev}, {torch.get_num_threads()} threads; batch {args.batch}, {args.features} features, "
          f"{args.classes} classes, K = {args.k}")
    print(f"linear head forward+backward: {t_lin * 1e3:.2f} ms; Dynamic-K head "
          f"({'compiled CPU kernel' if kernel else 'torch selection'}): {t_dk * 1e3:.2f} ms; "
          f"torch selection: {t_torch * 1e3:.2f} ms ({t_torch / t_lin:.1f}x linear)")
    print(f"ratio Dynamic-K / linear: {ratio:.2f} (target <= {TARGET}) {'OK' if ratio <= TARGET else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
