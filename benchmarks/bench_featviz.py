"""One feature-visualization step relative to one forward+backward of the same batch (target <= 1.1).

A step = Fourier parametrisation (1/f, decorrelated colour, sigmoid) -> standard transforms (pad, jitter, scale,
rotate, jitter; the affine ones fused) -> normalise -> forward (stopped after the hooked layer) -> gradient w.r.t.
the image parameters only -> Adam. The baseline is a training-style forward + backward (parameter gradients) of a
batch of the same size and resolution; both are timed in interleaved rounds (median and min-max of the per-round
ratios). torch-lucent (PyPI, the `bench` extra), the PyTorch port of Lucid, runs the same kind of step (Fourier
image, decorrelated colour, its standard transforms, ImageNet normalisation, Adam) side by side when installed;
skipped with one line otherwise.

    python3 benchmarks/bench_featviz.py [--backbone resnet18 --size 224 --batch 8 --layer backbone.layer4]
"""
from __future__ import annotations

import argparse

from common import Spread, imagenet_model_and_batch, interleaved, result  # also puts the repository root on sys.path

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

    candidates = {"ours": featviz_steps}
    lucent = lucent_steps(model, args.layer, args.batch, args.size, args.steps)
    if lucent is None:
        print("torch-lucent not installed (pip install torch-lucent, or the project's `bench` extra): skipped")
    else:
        candidates["lucent"] = lucent
    base, ratios = interleaved(fwd_bwd, candidates, args.repeats)
    ratios = {k: Spread(r / args.steps for r in v) for k, v in ratios.items()}  # per step
    model.zero_grad(set_to_none=True)
    print(f"device={device} threads={torch.get_num_threads()} {args.backbone}@{args.size} batch={args.batch} "
          f"objective=channel({args.layer}); forward+backward {base.median * 1e3:.1f} ms")
    print(f"featviz step (ours) / forward+backward    {ratios['ours']}  (target <= 1.1)")
    extra = {}
    if "lucent" in ratios:
        print(f"torch-lucent step / forward+backward      {ratios['lucent']}")
        extra["lucent"] = ratios["lucent"].median
    result("featviz", ratios["ours"], "forward+backward of the batch", **extra)


def lucent_steps(model, layer: str, batch: int, size: int, steps: int):
    """`steps` steps of torch-lucent's render_vis with the channel objective of each image in the batch, or None
    when lucent is not installed."""
    try:
        from lucent.optvis import objectives, param, render
    except ImportError:
        return None
    target = model.get_probe_layer(layer)
    # lucent names modules by their attribute path joined with "_"
    name = next(n.replace(".", "_") for n, m in model.named_modules() if m is target)
    objective = sum((objectives.channel(name, i, batch=i) for i in range(1, batch)),
                    objectives.channel(name, 0, batch=0))

    def run():
        render.render_vis(model, objective, lambda: param.image(size, batch=batch), thresholds=(steps,),
                          progress=False, show_image=False)
        # render_vis hooks every module and never removes its hooks: left there, each call would run all earlier
        # calls' hooks too (and so would the other candidates)
        for module in model.modules():
            module._forward_hooks.clear()
    return run


if __name__ == "__main__":
    main()
