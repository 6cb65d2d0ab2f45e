"""Attribution maps (Grad-CAM family, saliency, guided backprop, occlusion), their evaluation against ground-truth
object masks, and the per-epoch callback that computes, reduces, renders and logs them.

Call shape (as captum's): ``GradCAM(model, "backbone.conv4").attribute(images, target=None)`` -> maps
[B, 1, H, W] upsampled to the input; ``target`` is None/"predicted" (argmax of the same forward pass), an int, or a
LongTensor [B] (e.g. the true labels); out-of-range classes raise. ``model`` is a ClassifierModule (its
``class_scores`` are attributed: logits, or capsule lengths for CapsNet, and ``get_probe_layer`` resolves layer names)
or any nn.Module returning class scores. After ``attribute`` the method object holds ``target_`` and ``scores_`` of
that call, so a caller never needs a second forward pass to know what was explained.

Safety inside training: gradients come from ``torch.autograd.grad`` (parameter ``.grad`` is never filled); hooks are
removed in ``finally``; the model's modules, flags and mode are never changed.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import distributed as D
from callbacks.base import InterpretationCallback, write_json

log = logging.getLogger(__name__)



# ===================================================================================================================
# Targets, layers, forward passes
# ===================================================================================================================
def resolve_target(target, scores: Tensor) -> Tensor:
    """The class explained for each image, as a LongTensor [B] on the scores' device.

    None or "predicted": argmax of `scores` (the same forward pass, no second one); an int: that class for all;
    a sequence/tensor of B ints (e.g. the true labels). Classes outside 0..K-1 raise ValueError."""
    B, K = scores.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        return scores.detach().argmax(1)
    if isinstance(target, str):
        raise ValueError(f"target={target!r}: use None or 'predicted' (argmax of the model's scores), a class index "
                         f"0..{K - 1}, or a tensor of {B} class indices (e.g. the true labels)")
    t = torch.as_tensor(target, device=scores.device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"target has {t.numel()} entries for a batch of {B} images; give one class per image")
    bad = (t < 0) | (t >= K)
    if bool(bad.any()):
        raise ValueError(f"target class {t[bad][:5].tolist()} out of range: the model has {K} classes "
                         f"(valid targets 0..{K - 1})")
    return t


def scores_fn_of(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What is attributed: ClassifierModule.class_scores (logits; capsule lengths for CapsNet) or model(x)."""
    fn = getattr(model, "class_scores", None)
    return fn if callable(fn) else model


def resolve_layer(model: nn.Module, layer) -> nn.Module:
    """A module, or a probe-layer name (error lists the valid ones), or None (the model's default probe layer)."""
    if isinstance(layer, nn.Module):
        return layer
    if hasattr(model, "get_probe_layer"):
        return model.get_probe_layer(layer)  # raises ConfigError listing the available names
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n]
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}; available: {', '.join(names)}")
    return modules[layer]


def forward_from_layer(scores_fn: Callable[[Tensor], Tensor], layer: nn.Module, x: Tensor,
                       grad_above: bool = True) -> tuple[Tensor, Tensor]:
    """(scores [B, K], layer output A) from ONE forward pass.

    The part below `layer` runs without recording a graph; A is made a graph leaf inside the forward hook and grad
    mode switched on from there, so a backward from the scores to A touches only the layers above it (why Grad-CAM
    costs about one forward pass here). With grad_above=False nothing is recorded at all."""
    captured: list[Tensor] = []

    def hook(module, inputs, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"probe layer {type(module).__name__} returns {type(output).__name__}, not a tensor")
        if captured:
            raise RuntimeError("the probe layer ran twice in one forward pass; probe a layer that is used once")
        if grad_above:
            torch.set_grad_enabled(True)  # undone by the enclosing no_grad's exit
            output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            scores = scores_fn(x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the probe layer {type(layer).__name__} did not run in the model's forward pass")
    if scores.dim() != 2:
        raise ValueError(f"class scores must be [batch, classes], got shape {tuple(scores.shape)}")
    return scores, captured[0]


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of [B, C, h, w] maps to `size` (antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrink = maps.shape[-1] > size[-1] or maps.shape[-2] > size[-2]
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


# ===================================================================================================================
# Methods
# ===================================================================================================================
class Attribution:
    """Base of the methods: holds the model, the scores function and (layer methods) the probe layer."""

    name = "attribution"
    uses_layer = False

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None):
        self.model = model
        self.scores_fn = scores_fn_of(model)
        self.layer = resolve_layer(model, layer) if self.uses_layer else None
        self.target_: Tensor | None = None
        self.scores_: Tensor | None = None

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        raise NotImplementedError

    def _remember(self, scores: Tensor, target: Tensor) -> None:
        self.scores_, self.target_ = scores.detach(), target


class GradCAM(Attribution):
    """Grad-CAM (Selvaraju et al. 2017): alpha_ck = mean_ij dy_c/dA_k(i,j) (eq. 1), map = ReLU(sum_k alpha_ck A_k)
    (eq. 2; the ReLU is part of the method), bilinearly upsampled to the input.

    Versus captum's LayerGradCam: the target class is picked from the same forward pass (captum needs a separate
    one for the predicted class), the layers below the probe layer record no graph, the ReLU is on by default."""

    name = "gradcam"
    uses_layer = True

    def attribute(self, inputs: Tensor, target=None, relu: bool = True, upsample_to_input: bool = True) -> Tensor:
        scores, A = forward_from_layer(self.scores_fn, self.layer, inputs)
        t = resolve_target(target, scores)
        selected = scores.gather(1, t[:, None]).sum()  # images are independent in eval mode: one backward for all
        if not selected.requires_grad:
            raise RuntimeError("the class scores do not depend on the probe layer; pick a layer below the head")
        (grad,) = torch.autograd.grad(selected, A)
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        cam = (alpha * A.detach()).sum(1, keepdim=True)
        if relu:
            cam = cam.clamp_min(0)
        self._remember(scores, t)
        return upsample(cam, inputs.shape[-2:]) if upsample_to_input else cam


class CAM(Attribution):
    """Class Activation Mapping (Zhou et al. 2016): map_c = sum_k w_ck A_k for a head that is linear in the global
    average of A (GAP + linear). Uses `model.unit_contributions` for the weights and checks that its activations are
    the spatial mean of the probe layer. No ReLU (as in the paper).

    Relation to Grad-CAM: with y_c = sum_k w_ck (1/Z) sum_ij A_k(i,j) + b_c, dy_c/dA_k(i,j) = w_ck / Z, so
    Grad-CAM = ReLU(CAM) / Z, Z = h * w the number of positions of the probe layer."""

    name = "cam"
    uses_layer = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None):
        super().__init__(model, layer)
        if getattr(model, "unit_contributions", None) is None:
            raise ValueError(f"CAM needs model.unit_contributions (a GAP + linear head); {type(model).__name__} has "
                             f"none: use gradcam")

    def attribute(self, inputs: Tensor, target=None, upsample_to_input: bool = True) -> Tensor:
        captured: list[Tensor] = []
        handle = self.layer.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.no_grad():
                contrib = self.model.unit_contributions(inputs)
        finally:
            handle.remove()
        if contrib is None:
            raise ValueError(f"{type(self.model).__name__}.unit_contributions returned None: its head is not a sum "
                             f"over units, so CAM does not apply; use gradcam")
        acts, weights = contrib[0].detach(), contrib[1].detach()
        A = captured[-1]
        if A.dim() != 4 or A.shape[1] != acts.shape[1] or not torch.allclose(A.mean((2, 3)), acts, rtol=1e-3,
                                                                              atol=1e-4):
            raise ValueError("CAM needs a head that is linear in the global average of the probe layer's maps; "
                             "unit_contributions' activations are not that average for this layer: probe the last "
                             "conv layer before the pooling, or use gradcam")
        if target is None or isinstance(target, str):
            with torch.no_grad():
                scores = self.scores_fn(inputs)  # the decision needs the head's bias too
        else:
            # evidence without the bias: only used to check the explicit target's range
            scores = acts @ weights.T if weights.dim() == 2 else torch.einsum("bd,bkd->bk", acts, weights)
        t = resolve_target(target, scores)
        w = weights[t] if weights.dim() == 2 else weights[torch.arange(len(t), device=t.device), t]  # [B, D]
        cam = torch.einsum("bk,bkhw->bhw", w.to(A.dtype), A)[:, None]
        self._remember(scores, t)
        return upsample(cam, inputs.shape[-2:]) if upsample_to_input else cam


class Saliency(Attribution):
    """Saliency (Simonyan et al. 2014): |dy_c/dx|, max over colour channels -> [B, 1, H, W]. One forward pass picks
    the target and gives the gradient."""

    name = "saliency"

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            scores = self.scores_fn(x)
            t = resolve_target(target, scores)
            (grad,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), x)
        self._remember(scores, t)
        return grad.abs().amax(1, keepdim=True)


class _GuidedReLUGradient(torch.autograd.Function):
    """Identity forward; backward keeps only positive gradients. Placed after a ReLU, the ReLU's own backward then
    zeroes positions whose forward input was negative: together the guided backprop rule (Springenberg et al.)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()  # a fresh tensor, so later in-place ops (inplace ReLU, +=) never hit a custom-Function view

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


class GuidedBackprop(Attribution):
    """Guided backpropagation: the input gradient where every nn.ReLU passes only positive gradients (and only where
    its input was positive). Implemented with forward hooks on the nn.ReLU modules that wrap their output in a
    gradient clamp; the hooks are removed in `finally`, so the model is unchanged afterwards. Functional relu calls
    (F.relu in a forward) are not guided, as in captum; every backbone of this project uses nn.ReLU modules.
    Returns the signed gradient image [B, C, H, W]."""

    name = "guided_backprop"

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        relus = [m for m in self.model.modules() if isinstance(m, nn.ReLU)]
        if not relus:
            raise ValueError(f"{type(self.model).__name__} has no nn.ReLU modules, so guided backprop would equal the "
                             f"plain gradient; use saliency")
        handles = []
        try:
            for m in relus:
                handles.append(m.register_forward_hook(lambda mod, inp, out: _GuidedReLUGradient.apply(out)))
            x = inputs.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                scores = self.scores_fn(x)
                t = resolve_target(target, scores)
                (grad,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), x)
        finally:
            for h in handles:
                h.remove()
        self._remember(scores, t)
        return grad


class GuidedGradCAM(Attribution):
    """Guided Grad-CAM: guided backprop x upsampled Grad-CAM (Selvaraju et al. sec. 3.1) -> [B, C, H, W]. The class
    is picked in Grad-CAM's forward pass and handed to guided backprop."""

    name = "guided_gradcam"
    uses_layer = True

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        gradcam = GradCAM(self.model, self.layer)
        cam = gradcam.attribute(inputs, target)
        guided = GuidedBackprop(self.model).attribute(inputs, gradcam.target_)
        self._remember(gradcam.scores_, gradcam.target_)
        return guided * cam


class Occlusion(Attribution):
    """Occlusion (Zeiler & Fergus 2014): slide a patch of `baseline` (0 = the data set's mean colour in normalised
    space, i.e. grey) over the image and record the drop of the class score; captum's Occlusion evaluates many
    occluded copies per forward pass. Returns [B, 1, H, W]."""

    name = "occlusion"

    def __init__(self, model: nn.Module, layer=None, window: int | None = None, stride: int | None = None,
                 baseline: float = 0.0, images_per_forward: int = 256):
        super().__init__(model, layer)
        self.window, self.stride, self.baseline = window, stride, baseline
        self.images_per_forward = images_per_forward

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        from captum.attr import Occlusion as CaptumOcclusion
        B, C, H, W = inputs.shape
        window = self.window or max(2, H // 8)
        stride = self.stride or window  # non-overlapping by default: (H/w)^2 occluded copies per image
        with torch.no_grad():
            scores = self.scores_fn(inputs)
            t = resolve_target(target, scores)
            maps = CaptumOcclusion(self.scores_fn).attribute(
                inputs.detach(), sliding_window_shapes=(C, window, window), strides=(C, stride, stride),
                baselines=self.baseline, target=t, perturbations_per_eval=max(1, self.images_per_forward // B))
        self._remember(scores, t)
        return maps.mean(1, keepdim=True)


METHODS: dict[str, type[Attribution]] = {cls.name: cls for cls in
                                          (GradCAM, CAM, Saliency, GuidedBackprop, GuidedGradCAM, Occlusion)}


def get_method(name: str) -> type[Attribution]:
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def heatmap(maps: Tensor) -> Tensor:
    """[B, H, W] importance from a method's output: single-channel maps as they are, gradient images (guided
    backprop, guided Grad-CAM) as |.| max over channels."""
    return maps[:, 0] if maps.shape[1] == 1 else maps.abs().amax(1)


# ===================================================================================================================
# Evaluation of maps
# ===================================================================================================================
def pointing_game(heat: Tensor, mask: Tensor, tolerance: float = 0.0) -> tuple[Tensor, Tensor]:
    """(hit [B] bool, valid [B] bool). A hit: the map's maximum lies inside the object mask or within `tolerance`
    pixels of it (Zhang et al. 2016 use 15 px at 224 px; tolerance 0 = strictly inside). Images with an empty mask
    are not valid (never hits; a popular evaluation library counts them as hits); a constant map (no maximum) is a
    miss. `heat` [B, h, w] at the mask's resolution, `mask` bool [B, h, w]."""
    B, h, w = mask.shape
    flat, m = heat.flatten(1), mask.flatten(1)
    valid = m.any(1)
    peak = flat.argmax(1)
    informative = flat.amax(1) > flat.amin(1)
    if tolerance > 0:
        ys = torch.arange(h, device=mask.device).repeat_interleave(w)
        xs = torch.arange(w, device=mask.device).repeat(h)
        d2 = (ys[None] - (peak // w)[:, None]) ** 2 + (xs[None] - (peak % w)[:, None]) ** 2  # [B, h*w]
        inside = (d2.masked_fill(~m, h * h + w * w + 1).amin(1).float() <= tolerance ** 2)
    else:
        inside = m.gather(1, peak[:, None]).squeeze(1)
    return inside & informative & valid, valid


def energy_in_mask(heat: Tensor, mask: Tensor) -> Tensor:
    """Share of the positive attribution energy inside the mask, per image [B] (0 for an all-zero map)."""
    pos = heat.clamp_min(0).flatten(1)
    return (pos * mask.flatten(1)).sum(1) / pos.sum(1).clamp_min(1e-12)


def deletion_curve(scores_fn: Callable[[Tensor], Tensor], inputs: Tensor, heat: Tensor, target: Tensor,
                   steps: int = 20, baseline: float = 0.0, max_batch: int = 256) -> Tensor:
    """Class probability while the most important pixels are replaced by `baseline`, most important first
    (Petsiuk et al. 2018): [B, steps + 1], column k after deleting k/steps of the pixels. All steps of all images
    go through the model in chunks of at most `max_batch` images."""
    if not 1 <= steps <= 20:
        raise ValueError(f"deletion steps={steps}: use 1..20 (evaluation runs every epoch)")
    B, C, H, W = inputs.shape
    heat = upsample(heat[:, None], (H, W))[:, 0]
    order = heat.flatten(1).argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H * W, device=order.device).expand(B, -1))
    counts = torch.round(torch.linspace(0, 1, steps + 1, device=inputs.device) * H * W).long()
    per_chunk = max(1, max_batch // B)
    curve = []
    with torch.no_grad():
        for start in range(0, steps + 1, per_chunk):
            k = counts[start:start + per_chunk]  # [S]
            keep = (rank[None] >= k[:, None, None]).view(len(k), B, 1, H, W)
            x = torch.where(keep, inputs[None], torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device))
            probs = scores_fn(x.flatten(0, 1)).float().softmax(1).view(len(k), B, -1)
            curve.append(probs.gather(2, target.view(1, B, 1).expand(len(k), B, 1))[..., 0].T)
    return torch.cat(curve, 1)


def curve_auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves [B, S + 1] sampled evenly on [0, 1]."""
    S = curve.shape[1] - 1
    return (curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * S)


def average_ranks(v: Tensor) -> Tensor:
    """Ranks (0-based) of each row of [B, N], ties getting their average rank — as Spearman's rho needs; the many
    zeros of a ReLU'd Grad-CAM would otherwise be ranked by position."""
    s = v.sort(1).values.contiguous()
    lo = torch.searchsorted(s, v.contiguous(), right=False)
    hi = torch.searchsorted(s, v.contiguous(), right=True)
    return (lo + hi - 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps [B, ...] -> [B]; 0 where a map is constant (no ranking)."""
    ra, rb = average_ranks(a.flatten(1).double()), average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model that shares (does not copy) its Trainer/Fabric references."""
    memo = {id(v): v for k, v in vars(model).items() if k in ("_trainer", "_fabric") and v is not None}
    return copy.deepcopy(model, memo)


def randomize_top_layers(model: nn.Module, num_layers: int = 1, seed: int = 0) -> nn.Module:
    """Cascading model-parameter randomisation (Adebayo et al. 2018) on a deep copy: every parameter above the
    bottom `len(probe_layers) - num_layers` probe layers (the head, and the top `num_layers` probe layers) is
    re-initialised with its module's own initialiser, BatchNorm statistics reset. The live model is untouched; the
    same seed gives the same copy on every rank (the global RNG is forked, so training randomness is unaffected)."""
    layers = list(model.probe_layers().items()) if hasattr(model, "probe_layers") else []
    if num_layers < 1 or num_layers > len(layers):
        raise ValueError(f"sanity_layers={num_layers}: must be 1..{len(layers)} (probe layers: "
                         f"{', '.join(n for n, _ in layers) or 'none'})")
    rand = detached_copy(model)
    rand_layers = list(rand.probe_layers().values())
    kept = {id(p) for m in rand_layers[:len(rand_layers) - num_layers] for p in m.parameters()}
    kept_modules = {id(m) for layer in rand_layers[:len(rand_layers) - num_layers] for m in layer.modules()}
    devices = sorted({p.device.index or 0 for p in rand.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        reset = set()
        for m in rand.modules():
            if id(m) in kept_modules:
                continue
            own = list(m.parameters(recurse=False))
            if hasattr(m, "reset_parameters") and own:
                m.reset_parameters()
                reset.update(id(p) for p in own)
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        with torch.no_grad():
            for p in rand.parameters():
                if id(p) not in kept and id(p) not in reset:  # bare nn.Parameters (prototypes, capsule weights)
                    p.normal_(0.0, float(p.detach().float().std()) if p.numel() > 1 else 1.0)
    return rand.eval()


# ===================================================================================================================
# Ground-truth masks from a probe dataset
# ===================================================================================================================
class ProbeMasks:
    """Ground-truth object masks of probe items: the pixels carrying all pixel-level defining concepts of the image's
    class (on `shapes`: the main object, never a distractor — those use colours no class uses); image-level labels
    count as full-image masks (Broden). Without class_concepts: every object-category pixel."""

    def __init__(self, probe):
        cats = list(getattr(probe, "concept_categories", []))
        self.object_ids = [i for i, c in enumerate(cats) if c == "object"]
        self.class_concepts = {int(k): [int(c) for c in v] for k, v in
                               (getattr(probe, "class_concepts", None) or {}).items()}

    def __call__(self, item: dict) -> Tensor:
        seg, labels = item["seg"], item.get("image_labels")
        label = int(item.get("label", -1))
        concepts = self.class_concepts.get(label) if label >= 0 else None
        if not concepts:
            return torch.isin(seg, torch.tensor(self.object_ids, dtype=seg.dtype)).any(0) if self.object_ids else \
                torch.zeros(seg.shape[-2:], dtype=torch.bool)
        mask = torch.ones(seg.shape[-2:], dtype=torch.bool)
        for c in concepts:  # a handful of defining concepts per class
            present = (seg == c).any(0)
            if not bool(present.any()) and labels is not None and c < len(labels) and bool(labels[c]):
                continue  # image-level label: full-image mask, the intersection is unchanged
            mask &= present
        return mask


def collate_probe(items: list[dict], masks: ProbeMasks | None) -> dict[str, Tensor]:
    out = {"image": torch.stack([it["image"] for it in items]),
           "label": torch.stack([torch.as_tensor(it.get("label", -1)).long() for it in items])}
    out["raw"] = torch.stack([it["raw"] for it in items]) if "raw" in items[0] else None
    if masks is not None and "seg" in items[0]:
        out["mask"] = torch.stack([masks(it) for it in items])
    return out


class _PairsAsItems(torch.utils.data.Dataset):
    """(image, label) datasets (no probe set) seen as probe items without masks."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i][:2]
        return {"image": x, "label": torch.as_tensor(y)}


# ===================================================================================================================
# Rendering (rank 0)
# ===================================================================================================================
def render_overlays(images01: Tensor, maps: dict[str, Tensor], path, titles: list[str] | None = None) -> None:
    """One row per image: the image, then each method's map over it (heat maps) or alone (gradient images)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, cols = images01.shape[0], 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    imgs = images01.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for r in range(n):
        img = imgs[r][..., 0] if imgs.shape[-1] == 1 else imgs[r]
        axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r, 0].set_title(titles[r] if titles else "", fontsize=6)
        for c, (name, m) in enumerate(maps.items(), 1):
            m = m[r].detach().float().cpu()
            if m.shape[0] > 1:  # gradient image: centred, scaled to [0, 1]
                g = m / (2 * m.abs().max().clamp_min(1e-12)) + 0.5
                axes[r, c].imshow(g.permute(1, 2, 0).numpy().clip(0, 1))
            else:
                h = m[0]
                h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)
                axes[r, c].imshow(img, cmap="gray" if img.ndim == 2 else None)
                axes[r, c].imshow(h.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ===================================================================================================================
# The callback
# ===================================================================================================================
class AttributionCallback(InterpretationCallback):
    """Every `every_n_epochs`: attribution maps of the probe set (first `max_images`, sharded over ranks), evaluated
    with the pointing game and energy inside the object mask (where the data has masks), deletion AUC, and the
    model-randomisation sanity check for `sanity_method`; metrics summed over ranks. Rank 0 renders overlays of the
    first `num_render` images for `render_methods` (PNG + W&B) and writes metrics.json into the epoch folder.

    Metrics: interp/attribution/<method>/{pointing_game, energy, deletion_auc},
    interp/attribution/<sanity_method>/sanity_spearman."""

    name = "attribution"

    def __init__(self, methods: Sequence[str] = ("gradcam", "cam", "saliency"),
                 render_methods: Sequence[str] = ("gradcam", "cam", "saliency", "guided_backprop", "guided_gradcam",
                                                  "occlusion"),
                 layer: str | None = None, target: str = "true", max_images: int = 128, num_render: int = 8,
                 deletion_steps: int = 20, deletion_methods: Sequence[str] | None = None,
                 sanity_method: str | None = "gradcam", sanity_layers: int = 1, sanity_size: int = 32,
                 pointing_tolerance: float = 15 / 224,
                 split: str = "val", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        for m in list(methods) + list(render_methods) + list(deletion_methods or []) + \
                ([sanity_method] if sanity_method else []):
            get_method(m)  # unknown names fail at construction, listing the valid ones
        if target not in ("true", "predicted"):
            raise ValueError(f"callbacks.attribution.target={target!r}: use 'true' or 'predicted'")
        if not 1 <= deletion_steps <= 20:
            raise ValueError(f"callbacks.attribution.deletion_steps={deletion_steps}: use 1..20")
        self.methods, self.render_methods = list(methods), list(render_methods)
        self.deletion_methods = list(self.methods if deletion_methods is None else deletion_methods)
        self.layer, self.target, self.max_images, self.num_render = layer, target, int(max_images), int(num_render)
        self.deletion_steps, self.sanity_method = int(deletion_steps), sanity_method
        self.sanity_layers, self.sanity_size, self.split, self.seed = int(sanity_layers), int(sanity_size), split, seed
        self.pointing_tolerance = float(pointing_tolerance)

    def probe_items(self, trainer):
        """(dataset of probe items, ProbeMasks or None), limited to the first max_images."""
        dm = self.datamodule(trainer)
        probe = dm.probe_dataset(self.split) if hasattr(dm, "probe_dataset") else None
        if probe is not None:
            ds, masks = probe, ProbeMasks(probe)
        else:
            loader = dm.val_dataloader() if self.split == "val" else dm.test_dataloader()
            ds, masks = _PairsAsItems(loader.dataset), None
        n = min(len(ds), self.max_images)
        return torch.utils.data.Subset(ds, range(n)), masks

    def make(self, name: str, module):
        return get_method(name)(module, self.layer if get_method(name).uses_layer else None)

    def _targets(self, module, batch) -> Tensor | None:
        if self.target == "predicted":
            return None
        labels = batch["label"]
        if bool((labels < 0).any()):  # unlabelled probe images: explain the prediction
            with torch.no_grad():
                pred = scores_fn_of(module)(batch["image"]).argmax(1)
            labels = torch.where(labels < 0, pred, labels)
        return labels

    def run(self, trainer, module, epoch):
        device = module.device
        ds, masks = self.probe_items(trainer)
        methods = self.methods
        if "cam" in methods and not self._cam_applies(module, ds, device):
            methods = [m for m in methods if m != "cam"]
        shard = self.shard(ds)
        loader = torch.utils.data.DataLoader(shard, batch_size=self.batch_size, shuffle=False, num_workers=0,
                                             collate_fn=lambda items: collate_probe(items, masks))
        # per method: [pointing hits, valid masks, energy sum, strict pointing hits, deletion auc sum, count]
        stats = torch.zeros(len(methods), 6, dtype=torch.float64, device=device)
        sanity = torch.zeros(2, dtype=torch.float64, device=device)
        randomized = randomize_top_layers(module, self.sanity_layers, self.seed) if self.sanity_method else None
        scores_fn = scores_fn_of(module)
        for batch in self.progress(loader, "maps", total=len(loader)):
            x = batch["image"].to(device).clone()
            batch["image"] = x
            batch["label"] = batch["label"].to(device)
            target = self._targets(module, batch)
            mask = batch.get("mask")
            mask = mask.to(device) if mask is not None else None
            maps_of = {}
            for i, name in enumerate(methods):
                method = self.make(name, module)
                maps = method.attribute(x, target).detach()
                maps_of[name] = (maps, method.target_)
                heat = heatmap(maps)
                if mask is not None:
                    h = upsample(heat[:, None], mask.shape[-2:])[:, 0]
                    tol = self.pointing_tolerance * max(mask.shape[-2:])  # fraction of the side -> mask pixels
                    hit, valid = pointing_game(h, mask, tol)
                    stats[i, 0] += hit.sum()
                    stats[i, 1] += valid.sum()
                    stats[i, 2] += energy_in_mask(h, mask)[valid].sum()
                    stats[i, 3] += pointing_game(h, mask)[0].sum()
                if name in self.deletion_methods:
                    # chunks of batch_size images: larger forward batches were slower per image on CPU
                    auc = curve_auc(deletion_curve(scores_fn, x, heat, method.target_, self.deletion_steps,
                                                   max_batch=self.batch_size))
                    stats[i, 4] += auc.sum()
                    stats[i, 5] += len(x)
            if self.sanity_method:
                before, t = maps_of.get(self.sanity_method) or self._attribute(self.sanity_method, module, x, target)
                after = self.make(self.sanity_method, randomized).attribute(x, t).detach()
                size = (min(self.sanity_size, x.shape[-2]), min(self.sanity_size, x.shape[-1]))
                rho = spearman(upsample(heatmap(before)[:, None], size), upsample(heatmap(after)[:, None], size))
                sanity += torch.stack([rho.double().sum(), torch.tensor(float(len(x)), dtype=torch.float64,
                                                                          device=device)])
        stats, sanity = D.all_reduce_sum(stats), D.all_reduce_sum(sanity)
        metrics: dict[str, float] = {}
        for i, name in enumerate(methods):
            s = stats[i].tolist()
            if s[1] > 0:
                metrics[f"{name}/pointing_game"] = s[0] / s[1]
                metrics[f"{name}/pointing_game_strict"] = s[3] / s[1]
                metrics[f"{name}/energy"] = s[2] / s[1]
            if s[5] > 0:
                metrics[f"{name}/deletion_auc"] = s[4] / s[5]
        if self.sanity_method and sanity[1] > 0:
            metrics[f"{self.sanity_method}/sanity_spearman"] = float(sanity[0] / sanity[1])
        if self.is_rank_zero:
            self._render(trainer, module, ds, masks, epoch, metrics)
        return metrics

    def _attribute(self, name, module, x, target):
        method = self.make(name, module)
        return method.attribute(x, target).detach(), method.target_

    def _cam_applies(self, module, ds, device) -> bool:
        if getattr(module, "unit_contributions", None) is None:
            return False
        item = collate_probe([ds[0]], None)
        try:
            CAM(module, self.layer).attribute(item["image"].to(device))
            return True
        except ValueError as err:
            if not getattr(self, "_cam_skip_logged", False):  # once per run, not every epoch
                log.info("attribution: CAM skipped for %s (%s)", type(module).__name__, err)
                self._cam_skip_logged = True
            return False

    def _render(self, trainer, module, ds, masks, epoch, metrics):
        """Rank 0 only, no collectives: overlays of the first num_render probe images, and the epoch's JSON."""
        out = self.epoch_dir(trainer, epoch)
        write_json(out / "metrics.json", {"epoch": epoch, "layer": self.layer or getattr(module, "default_probe_layer",
                                                                                          None),
                                          "target": self.target, "num_images": len(ds), "metrics": metrics})
        n = min(self.num_render, len(ds))
        if n == 0 or not self.render_methods:
            return
        batch = collate_probe([ds[i] for i in range(n)], masks)
        x = batch["image"].to(module.device).clone()
        batch["image"], batch["label"] = x, batch["label"].to(module.device)
        target = self._targets(module, batch)
        maps = {}
        for name in self.render_methods:
            if name == "cam" and not self._cam_applies(module, ds, module.device):
                continue
            method = self.make(name, module)
            maps[name] = method.attribute(x, target).detach()
            target = method.target_ if target is None else target
        raw = batch["raw"] if batch["raw"] is not None else self._denormalize(trainer, x)
        names = getattr(self.datamodule(trainer), "class_names", None)
        titles = [f"{names[int(t)] if names else int(t)}" for t in target] if target is not None else None
        path = out / "overlays.png"
        render_overlays(raw, maps, path, titles)
        self.log_images(trainer, "overlays", [path])

    def _denormalize(self, trainer, x):
        dm = self.datamodule(trainer)
        return dm.denormalize(x) if hasattr(dm, "denormalize") else (x - x.min()) / (x.max() - x.min() + 1e-12)
