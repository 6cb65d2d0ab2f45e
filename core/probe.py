"""The probe helper every interpretation method uses: layer names -> hook points, activations of several layers from
one forward pass (with an early stop), and a safe mode to run in the middle of training.

    with interpretation_mode(model):                               # eval, grads on, flags/grads/RNG restored after
        out = capture(model, ["backbone.conv3", "backbone.conv4"], x)      # stops after conv4
        out.acts["backbone.conv4"]                                          # [B, U, h, w]
        out = capture(model, "backbone.conv4", x, scores=True)             # ... and the class scores [B, K]
        out = capture(model, "backbone.conv4", x, leaf=True)               # graph only above conv4 (Grad-CAM)

Layer names are the model's probe layers (core/protocol.py). `<layer>:pre_relu` names the input of the last nn.ReLU
inside <layer>: a unit that is off after its ReLU has no gradient there, but it does before it (lucid's *_pre_relu).
Hooks are registered in one place (`hooks`) and always removed, also when the forward pass raises.
"""
from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from core.errors import CapabilityError, ConfigError

PRE_RELU = ":pre_relu"


class StopForward(Exception):
    """Raised by the last needed hook: the layers above it are not computed."""


# ----- names -> modules ------------------------------------------------------------------------------------------
def probe_layers(model) -> "OrderedDict[str, nn.Module]":
    """The model's probe layers by name, in forward order (core/protocol.py `Interpretable`)."""
    getter = getattr(model, "probe_layers", None)
    if not callable(getter):
        raise CapabilityError(f"{type(model).__name__} has no probe_layers(): implement it (named layers in forward "
                              f"order, see core/protocol.py and docs/extending.md) to use interpretation methods")
    layers = OrderedDict(getter())
    if not layers:
        raise CapabilityError(f"{type(model).__name__}.probe_layers() is empty: name at least one layer")
    return layers


def default_layer(model) -> str:
    """The model's `default_probe_layer` when it names one, else its last probe layer."""
    layers = probe_layers(model)
    name = getattr(model, "default_probe_layer", "") or ""
    if name and name.removesuffix(PRE_RELU) not in layers:
        raise ConfigError(f"{type(model).__name__}.default_probe_layer={name!r} is not one of its probe layers "
                          f"({', '.join(layers)})")
    return name or next(reversed(layers))


POOLINGS = ("mean", "max")


def layer_pooling(model, layer: str) -> str:
    """How the model reads a probe layer's map (`layer_pooling`, core/protocol.py): "max" or "mean" (default)."""
    pooling = (getattr(model, "layer_pooling", None) or {}).get(layer.removesuffix(PRE_RELU), "mean")
    if pooling not in POOLINGS:
        raise ConfigError(f"{type(model).__name__}.layer_pooling[{layer!r}]={pooling!r}: use one of "
                          f"{', '.join(POOLINGS)}")
    return pooling


@dataclass(frozen=True)
class HookPoint:
    """Where a named activation is read: `module`'s output, or its input when `pre` (the `:pre_relu` variant)."""
    name: str
    layer: str
    module: nn.Module = field(compare=False)
    pre: bool = False


def valid_names(model) -> list[str]:
    """Every name `resolve` accepts for this model: the probe layers and their `:pre_relu` variants."""
    out = []
    for name, module in probe_layers(model).items():
        out.append(name)
        if any(isinstance(m, nn.ReLU) for m in module.modules()):
            out.append(name + PRE_RELU)
    return out


def resolve(model, names: str | nn.Module | Sequence[str | nn.Module] | None = None,
            option: str = "layer") -> "OrderedDict[str, HookPoint]":
    """Names (or modules) -> hook points, in the given order. None or [] -> the default layer. An unknown name raises
    ConfigError naming `option` (e.g. `callbacks.dissection.layers`) and the valid names."""
    if names is None or (isinstance(names, (list, tuple)) and not names):
        names = [default_layer(model)]
    elif isinstance(names, (str, nn.Module)):
        names = [names]
    layers = probe_layers(model)
    out: OrderedDict[str, HookPoint] = OrderedDict()
    for name in names:
        if isinstance(name, nn.Module):
            found = next((n for n, m in layers.items() if m is name), None)
            key = found or f"{type(name).__name__}@{id(name):x}"
            out[key] = HookPoint(key, found or key, name)
            continue
        name = str(name)
        base = name.removesuffix(PRE_RELU)
        if base not in layers:
            raise ConfigError(f"{option}: {name!r} is not a probe layer of {type(model).__name__}; valid: "
                              f"{', '.join(valid_names(model))}")
        module = layers[base]
        if name.endswith(PRE_RELU):
            relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
            if not relus:
                raise ConfigError(f"{option}: {name!r} does not exist: layer {base!r} has no nn.ReLU; use {base!r}")
            out[name] = HookPoint(name, base, relus[-1], pre=True)
        else:
            out[name] = HookPoint(name, base, module)
    return out


def resolve_one(model, name: str | nn.Module | None = None, option: str = "layer") -> HookPoint:
    return next(iter(resolve(model, name, option).values()))


def scores_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What decisions are about: `model.class_scores` (core/protocol.py) or, for a bare nn.Module, `model`."""
    fn = getattr(model, "class_scores", None)
    return fn if callable(fn) else model


# ----- hooks and capture -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def hooks(points: Iterable[tuple[nn.Module, Callable, bool]]):
    """The one place hooks are registered: (module, fn, pre) -> forward pre-hook fn(module, inputs) when pre, else
    forward hook fn(module, inputs, output) (whose return value, when not None, replaces the output). Removed even
    when the body raises."""
    handles = []
    try:
        for module, fn, pre in points:
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        yield handles
    finally:
        for h in handles:
            h.remove()


@dataclass
class Capture:
    acts: "OrderedDict[str, torch.Tensor]"
    scores: torch.Tensor | None = None


def capture(model, layers: str | nn.Module | Sequence[str | nn.Module] | None, x: torch.Tensor, *,
            scores: bool = False, stop: bool = True, detach: bool = True, leaf: bool = False,
            forward: Callable[[torch.Tensor], object] | None = None, option: str = "layer",
            points: Mapping[str, HookPoint] | None = None) -> Capture:
    """Activations of `layers` (and the class scores when `scores`) from ONE forward pass of `x`.

    stop: end the pass once every layer is captured and no scores are needed. detach: return detached tensors
    (off for objectives that need a graph). leaf: (one layer) the layer's output becomes a graph leaf that the rest
    of the forward pass uses, the part below runs without recording a graph and the part above with grad on, so a
    gradient to the layer costs only the layers above it (Grad-CAM). forward: what to run instead of the class
    scores (e.g. `model.features`). A layer that runs more than once keeps its first output."""
    points = OrderedDict(points) if points is not None else resolve(model, layers, option)
    if leaf and len(points) != 1:
        raise ValueError("capture(leaf=True) needs exactly one layer")
    acts: OrderedDict[str, torch.Tensor] = OrderedDict()
    by_module: dict[int, list[HookPoint]] = {}
    for p in points.values():
        by_module.setdefault(id(p.module) * 2 + int(p.pre), []).append(p)

    def record(point: HookPoint, value):
        if point.name in acts:
            return None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"probe layer {point.name!r} returns {type(value).__name__}, not a tensor; probe a "
                            f"layer whose output is a feature map")
        if leaf:
            torch.set_grad_enabled(True)  # undone when the enclosing no_grad block exits
            value = value.detach().requires_grad_(True)
            acts[point.name] = value
            return value
        if point.pre:  # an inplace ReLU overwrites its input after this hook
            value = value.clone()
        acts[point.name] = value.detach() if detach else value
        if stop and not scores and len(acts) == len(points):
            raise StopForward
        return None

    def make_hook(group: list[HookPoint], pre: bool):
        if pre:  # the ReLU's input
            def pre_hook(module, inputs):
                for p in group:
                    record(p, inputs[0])
            return pre_hook

        def hook(module, inputs, output):
            replaced = None
            for p in group:
                value = record(p, output)
                if value is not None:
                    replaced = value
            return replaced
        return hook

    run = forward or scores_fn(model)
    out = None
    grad_ctx = torch.no_grad() if leaf else contextlib.nullcontext()
    with hooks((g[0].module, make_hook(g, g[0].pre), g[0].pre) for g in by_module.values()):
        try:
            with grad_ctx:
                out = run(x)
        except StopForward:
            out = None
    missing = [n for n in points if n not in acts]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in {type(model).__name__}'s forward pass")
    if scores and isinstance(out, torch.Tensor) and out.dim() != 2:
        raise ValueError(f"class scores must be [batch, classes], got shape {tuple(out.shape)}")
    return Capture(OrderedDict((n, acts[n]) for n in points), out if (scores or leaf) else None)


# ----- running inside training ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None):
    """The random streams of torch (CPU and the model's CUDA device), Python and NumPy are restored afterwards, so a
    method that draws random numbers leaves the training run exactly as it would have been without it."""
    import numpy as np
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def interpretation_mode(model: nn.Module, grad: bool = True, rng: bool = True):
    """Eval mode, inference mode off (Lightning validates under inference_mode on GPUs) and grad mode on (or off
    with grad=False) for the duration; afterwards every module's train flag, every parameter's requires_grad and
    .grad, and (rng=True) the random streams are as before. Methods take gradients with autograd.grad, so parameter
    .grad is never meant to change; restoring it guards against a method that does."""
    modes = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    rng_ctx = preserved_rng(model_device(model)) if rng else contextlib.nullcontext()
    try:
        with rng_ctx, torch.inference_mode(False), torch.set_grad_enabled(grad):
            model.eval()
            yield model
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in requires.items():
            p.requires_grad_(flag)
        for p, g in grads.items():
            p.grad = g
