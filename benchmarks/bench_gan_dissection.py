"""GAN dissection cost: dissect_generator on N latents / generating and segmenting the same N samples (the work
any GAN dissection has to do), as the median and min-max of interleaved ratios (load from other processes hits
both sides).
Target <= 1.5. The cost does not depend on training, so untrained networks of the default sizes are used unless
checkpoints are given.

    python benchmarks/bench_gan_dissection.py [--samples 256] [--layer block1] [--repeats 5]
        [--gan <run>/checkpoints/last.ckpt] [--segmenter <run>/checkpoints/last.ckpt]
"""
from __future__ import annotations

import argparse

from common import interleaved, result

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--layer", default="block1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gan")
    p.add_argument("--segmenter")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared machine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from algorithms.gan.dissection import dissect_generator
    from algorithms.gan.sampling import concept_masks, latents
    from models.gan import GAN
    from models.segmenter import ConceptSegmenterModule
    torch.manual_seed(0)
    if a.gan:
        gan = GAN.load_from_checkpoint(a.gan, map_location="cpu", weights_only=False, segmenter=a.segmenter)
    else:
        gan = GAN()
        seg = (ConceptSegmenterModule.load_from_checkpoint(a.segmenter, map_location="cpu", weights_only=False)
               if a.segmenter else ConceptSegmenterModule(num_concepts=25, num_classes=12))
        gan._segmenter = [seg.eval().requires_grad_(False)]
    gan.eval()

    def generate_and_segment():
        with torch.no_grad():
            z = latents(gan, a.samples, 0)
            for s in range(0, len(z), a.batch_size):
                concept_masks(gan.concept_segmenter, gan.generate(z[s:s + a.batch_size]))

    def dissect():
        dissect_generator(gan, a.layer, a.samples, a.batch_size)

    base, ratios = interleaved(generate_and_segment, {"dissect": dissect}, a.repeats)
    r = ratios["dissect"]
    print(f"generate + segment {a.samples} samples: {base.median:.2f} s (median of {a.repeats}), "
          f"{torch.get_num_threads()} threads")
    print(f"GAN dissection of {a.layer} / generate + segment: {r}  target <= 1.5")
    result("gan_dissection", r, "generate and segment the same samples", samples=a.samples,
           generate_segment_s=base.median)

if __name__ == "__main__":
    main()
