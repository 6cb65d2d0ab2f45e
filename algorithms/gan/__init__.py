"""Interpreting GANs (lecture part 4): GAN Dissection of generator units against a concept segmenter (Bau et al.,
ICLR 2019), unit interventions with their average causal effect, closed-form latent directions (SeFa, Shen & Zhou
2021). The training-side pieces live with the model (models/hessian_penalty.py: the Hessian penalty of Peebles et
al. 2020; models/gan_metrics.py: the domain Fréchet distance). Plain code on the `GenerativeModel`
and `ConceptSegmenter` capabilities of core/protocol.py; docs/gan.md shows a worked example."""
