"""Feature visualization by optimisation (Olah et al., Distill 2017): maximise an objective over a parametrised image
under random transforms, many units at once (one batch element per unit, so a run costs about `steps` training
steps).

    param = FourierImage(batch=8, channels=3, size=64, device=model.device)
    obj = channel("backbone.conv4:pre_relu", range(8)) - 0.1 * diversity("backbone.conv4")
    images01, info = visualize(model, obj, param, transforms=standard_transforms(64 / 224), steps=256,
                               normalize=datamodule.normalize)

Activations are read through core.probe (hooks removed even when a step raises; the forward pass stops after the
deepest layer an objective reads unless it needs the class scores); gradients are taken with autograd.grad w.r.t.
the image parameters only (the model's parameter .grad is never filled); the model runs in
core.probe.interpretation_mode (eval, flags, grads and RNG restored); the device is the model's.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from algorithms.featviz.objectives import Objective, channel, unit_objective
from algorithms.featviz.transforms import fit_size
from core.probe import PRE_RELU, HookPoint, capture, interpretation_mode, model_device, resolve, valid_names


def objective_points(model: nn.Module, objective: Objective, option: str = "layer") -> "OrderedDict[str, HookPoint]":
    """Hook points of the layers an objective reads (`<layer>:pre_relu` included); unknown names raise ConfigError
    naming `option` and listing the valid names."""
    return resolve(model, list(objective.layers), option) if objective.layers else OrderedDict()


def objective_forward(model: nn.Module, objective: Objective, x: Tensor,
                      points: Mapping[str, HookPoint] | None = None) -> Tensor:
    """One forward pass with the objective's layers captured (core.probe.capture, graph kept) -> objective value
    [B]. `points`: the objective's hook points when already resolved (`objective_points`)."""
    points = objective_points(model, objective) if points is None else points
    ctx = capture(model, None, x, points=points, scores=objective.needs_scores, detach=False)
    return objective(ctx)


def visualize(model: nn.Module, objective: Objective, param: nn.Module, transforms: Callable | None = None,
              steps: int = 256, lr: float = 0.05, normalize: Callable[[Tensor], Tensor] | None = None,
              seed: int = 0, progress: Callable | None = None) -> tuple[Tensor, dict]:
    """Maximise `objective` (summed over the batch; elements are independent unless a term couples them) over the
    parameters of `param` with Adam. Returns (images in [0, 1] [B, C, H, W], {"objective": [steps] values}).
    `normalize` maps [0, 1] images to the model's input space (e.g. datamodule.normalize)."""
    if steps < 1:
        raise ValueError(f"featviz steps={steps}: must be >= 1")
    params = [p for p in param.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    transforms = transforms or (lambda img, gen: img)
    normalize = normalize or (lambda img: img)
    points = objective_points(model, objective)
    history = []
    with interpretation_mode(model):  # eval: BatchNorm statistics must not mix the units' images
        for _ in (progress(range(steps)) if progress else range(steps)):
            img = param()
            x = normalize(fit_size(transforms(img, g), img.shape[-2:]))
            value = objective_forward(model, objective, x, points)
            grads = torch.autograd.grad(-value.sum(), params)  # image parameters only: model .grad untouched
            for p, gr in zip(params, grads):
                p.grad = gr
            optimizer.step()
            history.append(float(value.detach().mean()))
        with torch.no_grad():
            images = param().detach()
    return images, {"objective": history}


def unit_activation(model: nn.Module, layer: str, images01: Tensor, units, normalize=None,
                    pooling: str = "mean") -> Tensor:
    """Activation of channel units[i] of `layer` on (untransformed) image i (its spatial mean, or its maximum with
    `pooling="max"`) -> [B]."""
    normalize = normalize or (lambda img: img)
    with interpretation_mode(model, grad=False):
        return objective_forward(model, channel(layer, units, pooling=pooling), normalize(images01))


def optimised_layer(model: nn.Module, layer: str, pre_relu: bool = True) -> str:
    """Where units are optimised: before `layer`'s last ReLU when pre_relu and it has one (a unit that is off, 0
    after its ReLU, on the initial image has no gradient there, but it has one before: lucid's *_pre_relu), else
    `layer` itself."""
    if not pre_relu or layer.endswith(PRE_RELU):
        return layer
    return layer + PRE_RELU if layer + PRE_RELU in valid_names(model) else layer


def visualize_units(model: nn.Module, layer: str, jobs: Sequence[tuple[str, int]], param: nn.Module, *,
                    steps: int, lr: float = 0.05, transforms: Callable | None = None,
                    normalize: Callable[[Tensor], Tensor] | None = None, pre_relu: bool = True, seed: int = 0,
                    progress: Callable | None = None, initial: nn.Module | None = None,
                    pooling: str = "mean") -> tuple[Tensor, Tensor]:
    """Visualise one batch of jobs (("unit", u): channel u of `layer`; ("class", c): class score c; see
    `featviz_jobs`), batch element i of `param` for job i. Units are optimised before the layer's last ReLU
    (`optimised_layer`) and measured after it, as the unit's activation: its spatial mean, or with `pooling="max"`
    its maximum over positions (the model's `layer_pooling`: ProtoPNet's last layer reads a prototype's similarity
    map through its maximum, so that is the prototype's activation).

    The objective stays the spatial mean for both poolings: on ProtoPNet's prototypes (shapes, docs/protopnet.md)
    raising every position reached a larger maximum than raising the maximum itself, whose gradient reaches one
    position per step and moves with the random transforms (median max-similarity gain 8.6 vs 7.5 after 128 steps,
    6.4 vs 3.5 after 32: benchmarks/protopnet_placement.py).

    Returns (values [N, 2]: the unit's activation (or class score) on the untransformed initial and final image,
    images [N, C, H, W] in [0, 1]). `initial`: the parametrisation whose image is the "initial" one of
    values[:, 0] when `param` does not start from noise (a warm start from the previous epoch's images: the gain
    stays measured against noise, comparable with a start from scratch)."""
    normalize = normalize or (lambda img: img)
    objective = unit_objective(optimised_layer(model, layer, pre_relu), jobs)
    measure = unit_objective(layer, jobs, pooling)
    values = torch.zeros(len(jobs), 2, device=model_device(model))
    with interpretation_mode(model, grad=False):
        values[:, 0] = objective_forward(model, measure, normalize((initial or param)()))
    images, _ = visualize(model, objective, param, transforms, steps, lr, normalize, seed=seed, progress=progress)
    with interpretation_mode(model, grad=False):
        values[:, 1] = objective_forward(model, measure, normalize(images))
    return values, images
