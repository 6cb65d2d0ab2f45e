"""GAN dissection cost: dissect_generator on N latents / generating and segmenting the same N samples (the work
any GAN dissection has to do), as the median of interleaved ratios (load from other processes hits both sides).
Target <= 1.5. The cost does not depend on training, so untrained networks of the default sizes are used unless
checkpoints are given.

    python benchmarks/bench_gan_dissection.py [--samples 256] [--layer block1] [--repeats 5]
        [--gan <run>/checkpoints/last.ckpt] [--segmenter <run>/checkpoints/last.ckpt]
"""
from __future__ import annotations

import argparse

from common import timed_ratios

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--layer", default="block1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gan")
    p.add_argument("--segmenter")
    a = p.parse_args()
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

    base, ratios = timed_ratios(generate_and_segment, {"dissect": dissect}, a.repeats)
    print(f"generate + segment {a.samples} samples: {base:.2f} s (median of {a.repeats})")
    print(f"GAN dissection of {a.layer} / generate + segment: {ratios['dissect']:.2f}x (median of {a.repeats} "
          f"interleaved ratios) target <= 1.5")


if __name__ == "__main__":
    main()
