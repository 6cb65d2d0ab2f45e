"""Generation with one generator layer read and, optionally, edited (the G(z) = f(h(z)) split of GAN Dissection),
and the segmenter's concept masks of the generated images. Every GAN method runs through these two functions.

Under DDP every method draws the same global probe latents and works on this rank's contiguous share of them
(`shard_latents`); what it averages is summed over ranks (`rank_sum`), so the result equals the single-process one."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from core import distributed as D
from core import probe
from core.errors import CapabilityError, ConfigError
from core.protocol import ConceptSegmenter, GenerativeModel, describe_missing

#: a concept is "present" at a pixel where the segmenter's probability exceeds this
PRESENT = 0.5


def check_generator(model, option: str = "model") -> None:
    if not isinstance(model, GenerativeModel):
        raise CapabilityError(f"{option}: the GAN methods need a generator; {describe_missing(model, GenerativeModel)}"
                              f" (train one with `python train.py model=gan`)")


def segmenter_of(model, option: str = "model.segmenter"):
    """The model's concept segmenter; a clear error when there is none."""
    seg = getattr(model, "concept_segmenter", None)
    if seg is None:
        raise ConfigError(f"{option} is not set: the GAN methods measure concepts with a trained segmenter. Train one "
                          f"with `python train.py model=segmenter` and pass {option}=<run>/checkpoints/last.ckpt")
    if not isinstance(seg, ConceptSegmenter):
        raise CapabilityError(f"{option}: {describe_missing(seg, ConceptSegmenter)}")
    return seg


def generate_with(model, layer: str, z: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  option: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, C, H, W] in [0, 1], the layer's map r = h(z) [B, U, h, w] before any edit). `edit(r)` returns
    the map f continues from (an ablation or insertion)."""
    point = probe.resolve_one(model, layer, option)
    seen: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        seen["r"] = output.detach()
        return edit(output) if edit is not None else None

    with probe.hooks([(point.module, hook, False)]):
        images = model.generate(z)
    if "r" not in seen:
        raise RuntimeError(f"layer {layer!r} did not run in {type(model).__name__}.generate")
    return images, seen["r"]


def concept_masks(segmenter, images: torch.Tensor) -> torch.Tensor:
    """bool [B, C+1, H, W]: where the segmenter sees each concept (index 0 unused)."""
    masks = segmenter.concept_probabilities(images) > PRESENT
    masks[:, 0] = False
    return masks


def concept_shares(segmenter, images: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C+1]: the share of pixels (inside `region` [H, W] or [B, H, W] bool, else of the image) of each concept."""
    masks = concept_masks(segmenter, images).float()
    if region is None:
        return masks.mean(dim=(2, 3))
    r = region.to(masks.device).float().expand(masks.shape[0], *masks.shape[2:])[:, None]
    return (masks * r).sum(dim=(2, 3)) / r.sum(dim=(2, 3)).clamp_min(1.0)


def latents(model, n: int, seed: int) -> torch.Tensor:
    """n latent codes from the model's prior, the same for the same seed (a fixed probe set of z)."""
    g = torch.Generator().manual_seed(int(seed))
    z = model.sample_latent(int(n), generator=g)
    return z.to(probe.model_device(model))


def shard_latents(model, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """(this rank's contiguous share of `latents(model, n, seed)`, the global index of its first latent). All n are
    drawn on every rank and then sliced, so the shares of the ranks together are the single-process probe set."""
    idx = D.shard_indices(int(n))
    start = idx[0] if idx else 0
    return latents(model, n, seed)[start:start + len(idx)], start


def agreed_shape(shape: Sequence[int] | None, ndim: int, device) -> tuple[int, ...]:
    """The shape every rank's local tensor has, also on a rank with an empty share (`shape` None, e.g. fewer
    samples than ranks): the ranks that did the work report it (one max-reduce, called on every rank)."""
    local = torch.tensor(list(shape) if shape is not None else [0] * ndim, device=device, dtype=torch.long)
    return tuple(int(v) for v in D.all_reduce_max(local).tolist())


def rank_sum(local: torch.Tensor | None, ndim: int, device) -> torch.Tensor:
    """The float64 sum over ranks of `local` (None on a rank with an empty share: it adds zeros of the shape the
    other ranks report)."""
    shape = agreed_shape(None if local is None else local.shape, ndim, device)
    t = torch.zeros(shape, dtype=torch.float64, device=device) if local is None else local.double()
    return D.all_reduce_sum(t)


def on_every_rank(device, fn: Callable, *args):
    """fn(*args), this rank's local work; a failure on any rank is raised on every rank here (D.raise_together: the
    failing rank its own error, the others PeerFailure), so none is left waiting in the collectives that follow."""
    out = error = None
    try:
        out = fn(*args)
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank together
        error = err
    D.raise_together(error, device)
    return out
