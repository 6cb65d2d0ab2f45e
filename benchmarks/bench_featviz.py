"""One feature-visualization step relative to one forward+backward of the same batch (target <= 1.1).

A step = Fourier parametrisation (1/f, decorrelated colour, sigmoid) -> standard transforms (pad, jitter, scale,
rotate, jitter; the affine ones fused) -> normalise -> forward (stopped after the hooked layer) -> gradient w.r.t.
the image parameters only -> Adam. The baseline is a training-style forward + backward (parameter gradients) of a
batch of the same size and resolution.

    python3 benchmarks/bench_featviz.py [--backbone resnet18 --size 224 --batch 8 --layer backbone.layer4]
"""
from __future__ import annotations

import argparse
import statistics

from common import imagenet_model_and_batch, synced_time as _time  # also puts the repository root on sys.path

import torch  # noqa: E402

from algorithms.featviz import FourierImage, channel, standard_transforms, visualize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", default="backbone.layer4")
    ap.add_argument("--steps", type=int, default=4, help="featviz steps per timed round (ratio is per step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared machine)")
    args = ap.parse_args()
    model, x, device = imagenet_model_and_batch(args.backbone, args.size, args.batch, args.threads)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    param = FourierImage(args.batch, 3, args.size, device=device)
    objective = channel(args.layer, range(args.batch))
    transforms = standard_transforms(args.size / 224)

    def fwd_bwd():
        model(x).logsumexp(1).sum().backward()

    def featviz_steps():
        visualize(model, objective, param, transforms, steps=args.steps, normalize=lambda im: (im - mean) / std)

    fwd_bwd()
    featviz_steps()
    ratios, base = [], []
    for _ in range(args.repeats):
        b = _time(fwd_bwd)
        f = _time(featviz_steps) / args.steps
        ratios.append(f / b)
        base.append(b)
    model.zero_grad(set_to_none=True)
    print(f"device={device} threads={torch.get_num_threads()} {args.backbone}@{args.size} batch={args.batch} "
          f"objective=channel({args.layer}); forward+backward {statistics.median(base) * 1e3:.1f} ms")
    print(f"featviz step / forward+backward  ratio {statistics.median(ratios):.2f}  (target <= 1.1)")


if __name__ == "__main__":
    main()
