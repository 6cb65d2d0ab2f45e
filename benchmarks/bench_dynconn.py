"""Dynamic-K head cost: forward + backward time of the Dynamic-K head divided by a linear head's on the same pooled
features (batch 256, 512 features, 365 classes, K = 5 -- the authors' Places365 / ResNet-18 setting). Target <= 1.5.

On the CPU the head runs the compiled kernel (models/csrc/dynamic_k.c); the script also times the pure-torch
selection (what runs on a GPU, for other dtypes, or without a C compiler) for comparison.

Run: `python3 benchmarks/bench_dynconn.py [--device cuda] [--repeat N]`. The ratios are the median and min-max over N
interleaved rounds (linear, then Dynamic-K; linear, then the torch selection) of their time ratio, so that load from
other processes hits both sides of each ratio alike; the times printed are medians too.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from common import interleaved, result  # noqa: E402  (puts the repository root on sys.path)
from models import dynk_kernel  # noqa: E402
from models.dynconn import DynamicKLinear  # noqa: E402

TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=365)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--inner", type=int, default=10, help="forward+backward steps per timed call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, which the compiled kernel shares "
                        "(1: stable ratios on a shared machine; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
        def steps():  # several per timed call: one step is a few ms, shorter than a scheduler's time slice
            for _ in range(args.inner):
                x.grad = None
                module.zero_grad(set_to_none=True)
                module(x).backward(g)
            sync()
        return steps

    kernel = dynk_kernel.applies(x, head.weight, head.bias, args.k)
    for _ in range(3):  # warm-up: the kernel's first call builds or loads it
        run(head)()

    def torch_selection():
        os.environ[dynk_kernel.ENV_SWITCH] = "0"
        try:
            run(head)()
        finally:
            os.environ.pop(dynk_kernel.ENV_SWITCH)

    base, ratios = interleaved(run(linear), {"dynk": run(head), "torch": torch_selection}, args.repeat)
    ratio, t_lin = ratios["dynk"], base.median
    print(f"device {dev}, {torch.get_num_threads()} threads; batch {args.batch}, {args.features} features, "
          f"{args.classes} classes, K = {args.k}")
    print(f"linear head forward+backward: {t_lin / args.inner * 1e3:.2f} ms; Dynamic-K head "
          f"({'compiled CPU kernel' if kernel else 'torch selection'}): {ratio}; torch selection: {ratios['torch']}")
    print(f"ratio Dynamic-K / linear: {ratio.median:.2f} (target <= {TARGET}) "
          f"{'OK' if ratio.median <= TARGET else 'ABOVE TARGET'}")
    result("dynconn", ratio, "linear head forward+backward", torch_selection=ratios["torch"].median,
           kernel=bool(kernel), linear_ms=t_lin / args.inner * 1e3)

if __name__ == "__main__":
    main()
