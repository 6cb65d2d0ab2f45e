"""Interpreting GANs (lecture part 4): GAN Dissection of generator units against a concept segmenter (Bau et al.,
ICLR 2019), unit interventions with their average causal effect, closed-form latent directions (SeFa, Shen & Zhou
2021), the Hessian penalty (Peebles et al. 2020) and a domain Fréchet distance. Plain code on the `GenerativeModel`
and `ConceptSegmenter` capabilities of core/protocol.py; docs/gan.md shows a worked example."""
