"""Attribution maps: Grad-CAM, CAM, saliency, guided backprop, guided Grad-CAM, occlusion, prototype activation maps
(ProtoPNet).

Call shape (as captum's): ``GradCAM(model, "backbone.conv4").attribute(images, target=None)`` -> maps [B, 1, H, W]
upsampled to the input; ``target`` is None/"predicted" (argmax of the same forward pass), an int, or a LongTensor [B]
(e.g. the true labels); out-of-range classes raise. ``model`` offers the protocol of core/protocol.py (its
``class_scores`` are attributed: logits, or capsule lengths for CapsNet; layer names are its probe layers, resolved by
core.probe) or is any nn.Module returning class scores (for the methods that need no layer). After ``attribute`` the
method object holds ``target_`` and ``scores_`` of that call, so a caller never needs a second forward pass to know
what was explained.

Safety inside training: gradients come from ``torch.autograd.grad`` (parameter ``.grad`` is never filled); hooks
(core.probe) are removed even when the forward pass raises; the model's modules, flags and mode are never changed.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from algorithms.attribution.maps import upsample
from algorithms.attribution.targets import resolve_target
from core.errors import CapabilityError, ConfigError
from core.probe import HookPoint, capture, hooks, resolve_one, scores_fn
from core.protocol import PrototypeModel, UnitHead, describe_missing


def layer_point(model, layer: str | nn.Module | HookPoint | None = None, option: str = "layer") -> HookPoint:
    """The probe layer a map is read from (None: the model's default layer). Maps are of a layer's output, so the
    `:pre_relu` variants are refused with the name to use instead."""
    if isinstance(layer, HookPoint):
        return layer
    point = resolve_one(model, layer, option)
    if point.pre:
        raise ConfigError(f"{option}: {point.name!r}: attribution maps are read from a layer's output (the maps of "
                          f"the Grad-CAM paper are post-ReLU); use {point.layer!r}")
    return point


class Attribution:
    """Base of the methods: holds the model, its scores function and (layer methods) the probe layer's hook point."""

    name = "attribution"
    uses_layer = False
    requires: tuple[type, ...] = ()  # capabilities (core/protocol.py) the method needs beyond class scores

    def __init__(self, model: nn.Module, layer: str | nn.Module | HookPoint | None = None, option: str = "layer"):
        self.model = model
        self.scores_fn = scores_fn(model)
        self.point = layer_point(model, layer, option) if self.uses_layer else None
        self.target_: Tensor | None = None
        self.scores_: Tensor | None = None

    @property
    def layer(self) -> nn.Module | None:
        """The probed module (None for methods on the input)."""
        return self.point.module if self.point is not None else None

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        raise NotImplementedError

    def _capture(self, inputs: Tensor, **kwargs):
        return capture(self.model, None, inputs, points={self.point.name: self.point}, **kwargs)

    def _remember(self, scores: Tensor, target: Tensor) -> None:
        self.scores_, self.target_ = scores.detach(), target


class GradCAM(Attribution):
    """Grad-CAM (Selvaraju et al. 2017): alpha_ck = mean_ij dy_c/dA_k(i,j) (eq. 1), map = ReLU(sum_k alpha_ck A_k)
    (eq. 2; the ReLU is part of the method), bilinearly upsampled to the input.

    Versus captum's LayerGradCam: the target class is picked from the same forward pass (captum needs a separate
    one for the predicted class), the layers below the probe layer record no graph (core.probe.capture leaf=True:
    the layer's output becomes a graph leaf, so the backward stops there), the ReLU is on by default."""

    name = "gradcam"
    uses_layer = True

    def attribute(self, inputs: Tensor, target=None, relu: bool = True, upsample_to_input: bool = True) -> Tensor:
        out = self._capture(inputs, leaf=True, scores=True)
        scores, A = out.scores, out.acts[self.point.name]
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
    average of A (GAP + linear). Needs a `UnitHead` (core/protocol.py) for the weights and checks that its
    activations are the spatial mean of the probe layer. No ReLU (as in the paper).

    Relation to Grad-CAM: with y_c = sum_k w_ck (1/Z) sum_ij A_k(i,j) + b_c, dy_c/dA_k(i,j) = w_ck / Z, so
    Grad-CAM = ReLU(CAM) / Z, Z = h * w the number of positions of the probe layer."""

    name = "cam"
    uses_layer = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | HookPoint | None = None, option: str = "layer"):
        if not isinstance(model, UnitHead):
            raise CapabilityError(f"CAM needs a sum-over-units head: {describe_missing(model, UnitHead)}; use gradcam")
        super().__init__(model, layer, option)

    def attribute(self, inputs: Tensor, target=None, upsample_to_input: bool = True) -> Tensor:
        with torch.no_grad():
            # the unit activations and the layer's maps from one pass (capture hands back unit_contributions' output)
            out = self._capture(inputs, scores=True, stop=False, forward=self.model.unit_contributions)
        contrib, A = out.scores, out.acts[self.point.name]
        if contrib is None:
            raise ValueError(f"{type(self.model).__name__}.unit_contributions returned None: its head is not a sum "
                             f"over units, so CAM does not apply; use gradcam")
        acts, weights = contrib[0].detach(), contrib[1].detach()
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


def cam_unavailable(model, images: Tensor, layer: str | nn.Module | HookPoint | None = None) -> str:
    """'' when CAM applies to `model` at `layer` (a UnitHead whose activations are the layer's global average,
    tried on `images`), else the reason it does not."""
    if not isinstance(model, UnitHead):
        return describe_missing(model, UnitHead)
    try:
        CAM(model, layer).attribute(images)
    except ValueError as err:
        return str(err)
    return ""


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


def _guide(module, inputs, output):
    return _GuidedReLUGradient.apply(output)


class GuidedBackprop(Attribution):
    """Guided backpropagation: the input gradient where every nn.ReLU passes only positive gradients (and only where
    its input was positive). Forward hooks (core.probe.hooks) on the nn.ReLU modules wrap their output in a gradient
    clamp; they are removed afterwards, so the model is unchanged. Functional relu calls (F.relu in a forward) are
    not guided, as in captum; every backbone of this project uses nn.ReLU modules. Returns the signed gradient image
    [B, C, H, W]."""

    name = "guided_backprop"

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        relus = [m for m in self.model.modules() if isinstance(m, nn.ReLU)]
        if not relus:
            raise ValueError(f"{type(self.model).__name__} has no nn.ReLU modules, so guided backprop would equal the "
                             f"plain gradient; use saliency")
        x = inputs.detach().clone().requires_grad_(True)
        with hooks((m, _guide, False) for m in relus), torch.enable_grad():
            scores = self.scores_fn(x)
            t = resolve_target(target, scores)
            (grad,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), x)
        self._remember(scores, t)
        return grad


class GuidedGradCAM(Attribution):
    """Guided Grad-CAM: guided backprop x upsampled Grad-CAM (Selvaraju et al. sec. 3.1) -> [B, C, H, W]. The class
    is picked in Grad-CAM's forward pass and handed to guided backprop."""

    name = "guided_gradcam"
    uses_layer = True

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        gradcam = GradCAM(self.model, self.point)
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


class PrototypeMaps(Attribution):
    """Prototype activation maps (Chen et al. 2019, Fig. 2/3): a ProtoPNet's evidence for class c is
    sum_j sim_j w_cj with sim_j the maximum of prototype j's similarity map; the map shown is the sum over the `top`
    prototypes of largest positive contribution of w_cj x (their similarity maps), bilinearly upsampled to the
    input, i.e. where the evidence the decision rests on was found. Needs a PrototypeModel."""

    name = "prototype_maps"
    requires = (PrototypeModel,)
    top = 3

    def __init__(self, model: nn.Module, layer=None, option: str = "layer"):
        if not isinstance(model, PrototypeModel):
            raise CapabilityError(f"prototype_maps: {describe_missing(model, PrototypeModel)}")
        super().__init__(model, None, option)

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        with torch.no_grad():
            maps = self.model.similarity_maps(inputs) * self.model.prototype_active[None, :, None, None]
            sim = maps.flatten(2).amax(dim=2)                                         # [B, m]
            scores = self.model.last_layer(sim)
            t = resolve_target(target, scores)
            weight = self.model.last_layer.weight[t]                                  # [B, m]
            contrib, order = (sim * weight).topk(min(self.top, sim.shape[1]), dim=1)
            keep = weight.gather(1, order) * (contrib > 0)                            # only evidence for c
            rows = torch.arange(len(inputs), device=inputs.device)[:, None]
            out = (maps[rows, order] * keep[:, :, None, None]).sum(1, keepdim=True)
        self._remember(scores, t)
        return upsample(out, inputs.shape[-2:])


METHODS: dict[str, type[Attribution]] = {cls.name: cls for cls in
                                          (GradCAM, CAM, Saliency, GuidedBackprop, GuidedGradCAM, Occlusion,
                                           PrototypeMaps)}


def get_method(name: str, option: str = "method") -> type[Attribution]:
    """The method class called `name`; an unknown name raises ConfigError naming `option` and the valid names."""
    if name not in METHODS:
        raise ConfigError(f"{option}: unknown attribution method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_unavailable(name: str, model) -> str:
    """'' when method `name` applies to `model`, else why not (a capability it lacks)."""
    for capability in get_method(name).requires:
        if not isinstance(model, capability):
            return describe_missing(model, capability)
    return ""


def make_method(name: str, model: nn.Module, layer: str | nn.Module | HookPoint | None = None) -> Attribution:
    """`name`'s method on `model`; `layer` is used by the methods that read a layer (Grad-CAM, CAM, guided
    Grad-CAM) and ignored by the others."""
    cls = get_method(name)
    return cls(model, layer) if cls.uses_layer else cls(model)


def attribution_maps(model: nn.Module, inputs: Tensor, methods: Sequence[str], layer=None,
                     target=None) -> tuple[dict[str, Tensor], Tensor | None]:
    """({method: maps}, explained classes) of the same images: with target None the first method's forward pass
    picks the predicted class and every later method explains that class."""
    maps = {}
    for name in methods:
        method = make_method(name, model, layer)
        maps[name] = method.attribute(inputs, target).detach()
        target = method.target_ if target is None else target
    return maps, target
