"""Grad-CAM cost relative to one plain forward pass of the same batch (target <= 1.2), with the public
implementations timed side by side in the same interleaved rounds (median and min-max of the per-round ratios).

resnet18 at 224 px, batch 16, layer4; the target class is the predicted one, picked inside the timed call (our
GradCAM picks it from its own forward pass; captum's LayerGradCam needs a separate forward for it, timed both ways;
pytorch-grad-cam (PyPI `grad-cam`, the `bench` extra) picks it from its own forward and returns maps upsampled to the
input, min-max scaled per image). A reference that is not installed is skipped with one line.

    python3 benchmarks/bench_gradcam.py [--batch 16] [--size 224] [--repeats 5]
"""
from __future__ import annotations

import argparse

from common import imagenet_model_and_batch, interleaved, result  # also puts the repository root on sys.path

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

    candidates = {"ours": ours, "captum": captum_map_only, "captum+target": captum_with_target}
    try:
        from pytorch_grad_cam import GradCAM as ReferenceGradCAM

        def reference():
            # its hooks stay on the layer until released: inside the call, so the other candidates never run them
            with ReferenceGradCAM(model=model, target_layers=[layer]) as cam:
                cam(input_tensor=x, targets=None)
        candidates["pytorch-grad-cam"] = reference
    except ImportError:
        print("pytorch-grad-cam not installed (pip install grad-cam, or the project's `bench` extra): skipped")

    t_fwd, r = interleaved(forward, candidates, args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} {args.backbone}@{args.size} batch={args.batch} "
          f"layer={args.layer}; plain forward (no_grad) {t_fwd.median * 1e3:.1f} ms; ratios to it over interleaved "
          f"rounds:")
    print(f"GradCAM (ours, predicted class from the same forward)  {r['ours']}  (target <= 1.2)")
    print(f"captum LayerGradCam, map only (target given)          {r['captum']}")
    print(f"captum LayerGradCam + forward to pick the target       {r['captum+target']}")
    extra = {"captum": r["captum"].median, "captum_target": r["captum+target"].median}
    if "pytorch-grad-cam" in r:
        print(f"pytorch-grad-cam GradCAM (predicted class)             {r['pytorch-grad-cam']}")
        extra["pytorch_grad_cam"] = r["pytorch-grad-cam"].median
    result("gradcam", r["ours"], "no-grad forward of the batch", **extra)


if __name__ == "__main__":
    main()
