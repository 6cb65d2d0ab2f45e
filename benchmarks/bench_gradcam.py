"""Grad-CAM cost relative to one plain forward pass of the same batch (target <= 1.2).

resnet18 at 224 px, batch 16, layer4; the target class is the predicted one, picked inside the timed call (our
GradCAM picks it from its own forward pass; captum's LayerGradCam needs a separate forward for it, timed both ways).

    python3 benchmarks/bench_gradcam.py [--batch 16] [--size 224] [--repeats 5]
"""
from __future__ import annotations

import argparse

from common import imagenet_model_and_batch, timed_ratios  # also puts the repository root on sys.path

import torch  # noqa: E402

from algorithms.attribution import GradCAM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--layer", default="backbone.layer4")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 keeps ratios stable on a shared machine (other processes stall one "
                         "of several intra-op threads and every op waits for it)")
    args = ap.parse_args()
    from captum.attr import LayerGradCam

    model, x, device = imagenet_model_and_batch(args.backbone, args.size, args.batch, args.threads)
    layer = model.get_probe_layer(args.layer)

    def forward():
        with torch.no_grad():
            model(x)

    def ours():
        GradCAM(model, args.layer).attribute(x)  # target=None: the predicted class of the same forward

    captum = LayerGradCam(model, layer)
    with torch.no_grad():
        fixed_target = model(x).argmax(1)

    def captum_map_only():
        captum.attribute(x, target=fixed_target, relu_attributions=True)

    def captum_with_target():
        with torch.no_grad():
            t = model(x).argmax(1)
        captum.attribute(x, target=t, relu_attributions=True)

    t_fwd, r = timed_ratios(forward, {"ours": ours, "captum": captum_map_only, "captum+target": captum_with_target},
                            args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} {args.backbone}@{args.size} batch={args.batch} "
          f"layer={args.layer}; plain forward (no_grad) {t_fwd * 1e3:.1f} ms; ratios are medians of interleaved rounds")
    print(f"GradCAM (ours, predicted class from the same forward)  ratio {r['ours']:.2f}  (target <= 1.2)")
    print(f"captum LayerGradCam, map only (target given)          ratio {r['captum']:.2f}")
    print(f"captum LayerGradCam + forward to pick the target       ratio {r['captum+target']:.2f}")


if __name__ == "__main__":
    main()
