"""Feature visualization by optimisation (Olah et al., Distill 2017) as three small vocabularies composed by the
caller — objectives, parametrisations, transforms — plus the first-layer filter grid and maximally activating
dataset patches; below them the per-epoch callback.

    param = FourierImage(batch=8, channels=3, size=64, device=model.device)
    obj = channel("backbone.conv4", units=range(8)) - 0.1 * diversity("backbone.conv4")
    images01, info = visualize(model, obj, param, transforms=standard_transforms(), steps=256,
                               normalize=datamodule.normalize)

Many units are optimised at once, one batch element per unit, so a run costs about `steps` training steps. Hooks are
removed in `finally`; gradients are taken with autograd.grad w.r.t. the image parameters only (the model's
parameter .grad is never filled); the forward pass stops after the deepest hooked layer when no objective needs the
class scores; the model's train/eval flags are restored; the device is the model's.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import distributed as D
from callbacks.attribution import resolve_layer, scores_fn_of
from callbacks.base import InterpretationCallback, write_json

log = logging.getLogger(__name__)


# ===================================================================================================================
# Objectives: callables ctx -> [B] (one value per batch element), addable and scalable
# ===================================================================================================================
class Objective:
    """`fn(ctx) -> [B]` where ctx.acts[layer name] is that layer's output and ctx.scores the class scores (None
    unless some term needs them). Objectives add, subtract and scale: `channel(...) - 0.1 * diversity(...)`."""

    def __init__(self, fn: Callable, layers: Sequence[str] = (), needs_scores: bool = False, name: str = ""):
        self.fn, self.layers, self.needs_scores, self.name = fn, tuple(dict.fromkeys(layers)), needs_scores, name

    def __call__(self, ctx) -> Tensor:
        return self.fn(ctx)

    def _combine(self, other, op, symbol):
        if isinstance(other, Objective):
            return Objective(lambda ctx: op(self(ctx), other(ctx)), self.layers + other.layers,
                             self.needs_scores or other.needs_scores, f"({self.name} {symbol} {other.name})")
        return Objective(lambda ctx: op(self(ctx), other), self.layers, self.needs_scores,
                         f"({self.name} {symbol} {other})")

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b, "+")

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b, "-")

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, Objective):
            raise TypeError("objectives are scaled by numbers, not multiplied together")
        return self._combine(other, lambda a, b: a * b, "*")

    __rmul__ = __mul__

    def __neg__(self):
        return Objective(lambda ctx: -self(ctx), self.layers, self.needs_scores, f"-{self.name}")


def _per_element(values: Tensor, units: Tensor, offset: int) -> Tensor:
    """values [B, D...] -> [B]: element offset + i gets unit units[i]; other elements 0."""
    B = values.shape[0]
    out = values.new_zeros(B)
    idx = torch.arange(offset, offset + len(units), device=values.device)
    if idx.numel() and int(idx[-1]) >= B:
        raise ValueError(f"the objective addresses batch elements {offset}..{offset + len(units) - 1} but the batch "
                         f"has {B}; make the parametrisation's batch as large as the number of units")
    return out.index_put((idx,), values[idx, units.to(values.device)])


def _units(units) -> Tensor:
    return torch.as_tensor([units] if isinstance(units, int) else list(units), dtype=torch.long)


def channel(layer: str, units, offset: int = 0) -> Objective:
    """Mean activation of channel units[i] of `layer` for batch element offset + i."""
    u = _units(units)

    def fn(ctx):
        a = ctx.acts[layer]
        return _per_element(a.mean((2, 3)) if a.dim() == 4 else a, u, offset)
    return Objective(fn, [layer], name=f"channel({layer})")


def neuron(layer: str, units, y: int | None = None, x: int | None = None, offset: int = 0) -> Objective:
    """Activation of channel units[i] at one spatial position (the centre by default) for element offset + i."""
    u = _units(units)

    def fn(ctx):
        a = ctx.acts[layer]
        h, w = a.shape[-2:]
        return _per_element(a[:, :, h // 2 if y is None else y, w // 2 if x is None else x], u, offset)
    return Objective(fn, [layer], name=f"neuron({layer})")


def class_logit(classes, offset: int = 0) -> Objective:
    """Class score (logit; capsule length for CapsNet) of classes[i] for element offset + i."""
    c = _units(classes)
    return Objective(lambda ctx: _per_element(ctx.scores, c, offset), needs_scores=True, name="class_logit")


def diversity(layer: str) -> Objective:
    """Minus the mean cosine similarity of each element's Gram matrix (channel correlations) to the others' (the
    diversity term of Olah et al.); add it with a negative weight... it is already negated: maximise it."""

    def fn(ctx):
        a = ctx.acts[layer]
        B, C = a.shape[:2]
        if B < 2:
            return a.new_zeros(B)
        flat = a.flatten(2)
        gram = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
        sim = gram @ gram.T
        return -(sim.sum(1) - sim.diagonal()) / (B - 1)
    return Objective(fn, [layer], name=f"diversity({layer})")


# ===================================================================================================================
# Parametrisations: nn.Modules whose forward() returns images in [0, 1], [B, C, H, W]
# ===================================================================================================================
# Square root of the RGB colour correlation of natural images (ImageNet), the constant of the lucid papers;
# `colour_correlation_sqrt(images)` derives the same matrix from a data set's own pixels.
IMAGENET_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def colour_correlation_sqrt(images01: Tensor) -> Tensor:
    """Symmetric square root of the colour covariance of images [N, 3, H, W] in [0, 1]."""
    px = images01.transpose(0, 1).flatten(1).double()
    cov = torch.cov(px)
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T).float()


class _ImageParam(nn.Module):
    def __init__(self, channels: int, colour_sqrt: Tensor | None, decorrelate: bool):
        super().__init__()
        self.channels = channels
        if decorrelate and channels == 3:
            m = IMAGENET_COLOUR_SQRT if colour_sqrt is None else colour_sqrt
            # columns scaled so no decorrelated direction exceeds unit norm (keeps the sigmoid's input range)
            self.register_buffer("colour", m / m.norm(dim=0).max())
        else:
            self.colour = None

    def to_rgb(self, img: Tensor) -> Tensor:
        if self.colour is not None:
            img = torch.einsum("ij,bjhw->bihw", self.colour, img)
        return torch.sigmoid(img)


class PixelImage(_ImageParam):
    """Pixels (in decorrelated colour for RGB) through a sigmoid."""

    def __init__(self, batch: int, channels: int, size: int, sd: float = 0.01, decorrelate: bool = True,
                 colour_sqrt: Tensor | None = None, device=None, generator: torch.Generator | None = None):
        super().__init__(channels, colour_sqrt, decorrelate)
        init = torch.randn(batch, channels, size, size, generator=generator) * sd
        self.pixels = nn.Parameter(init.to(device))
        self.to(device)

    def forward(self) -> Tensor:
        return self.to_rgb(self.pixels)


class FourierImage(_ImageParam):
    """The image's 2-D spectrum, N(0, sd) at init, scaled by 1 / max(|f|, 1/size)^decay_power (1/f: every frequency
    band gets a similar share of the gradient, so high frequencies do not dominate), inverse real FFT, decorrelated
    colour, sigmoid."""

    def __init__(self, batch: int, channels: int, size: int, sd: float = 0.01, decay_power: float = 1.0,
                 decorrelate: bool = True, colour_sqrt: Tensor | None = None, device=None,
                 generator: torch.Generator | None = None):
        super().__init__(channels, colour_sqrt, decorrelate)
        self.size = size
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freq = (fy ** 2 + fx ** 2).sqrt()
        self.register_buffer("scale", 1.0 / freq.clamp_min(1.0 / size) ** decay_power)
        init = torch.randn(batch, channels, size, size // 2 + 1, 2, generator=generator) * sd
        self.spectrum = nn.Parameter(init.to(device))
        self.to(device)

    def forward(self) -> Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        return self.to_rgb(img / 4)  # /4: the spectrum's scale puts pixel values ~4x above the sigmoid's knee


PARAMETRISATIONS = {"fourier": FourierImage, "pixel": PixelImage}


# ===================================================================================================================
# Transforms: callables (images01 [B, C, H, W], generator) -> images (transformation robustness)
# ===================================================================================================================
def pad(width: int, value: float = 0.5):
    return lambda img, g: F.pad(img, (width,) * 4, mode="constant", value=value)


def jitter(d: int):
    """Random crop shifting the image by up to d pixels (one offset for the batch)."""
    def fn(img, g):
        dy, dx = torch.randint(0, d + 1, (2,), generator=g).tolist()
        H, W = img.shape[-2:]
        return img[..., dy:H - d + dy, dx:W - d + dx]
    return fn


def _affine(img: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AffineTransform:
    """A random per-image affine map; consecutive ones are fused by `compose` into one resampling (one
    grid_sample and its backward per step instead of one per transform)."""

    def __init__(self, theta_fn: Callable[[int, torch.Generator], Tensor]):
        self.theta_fn = theta_fn  # (batch, generator) -> [B, 2, 3] on the CPU

    def theta(self, batch: int, g: torch.Generator) -> Tensor:
        return self.theta_fn(batch, g)

    def __call__(self, img, g):
        return _affine(img, self.theta(img.shape[0], g).to(img))


def _homogeneous(theta: Tensor) -> Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], 1)


def random_scale(scales: Sequence[float] = (0.9, 0.95, 1.0, 1.05, 1.1)) -> AffineTransform:
    """Zoom each image by a factor drawn from `scales`."""
    s_all = torch.tensor(list(scales))

    def theta(B, g):
        s = s_all[torch.randint(0, len(s_all), (B,), generator=g)]
        th = torch.zeros(B, 2, 3)
        th[:, 0, 0] = th[:, 1, 1] = 1.0 / s
        return th
    return AffineTransform(theta)


def random_rotate(degrees: float = 10.0) -> AffineTransform:
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees]."""
    def theta(B, g):
        a = (torch.rand(B, generator=g) * 2 - 1) * math.radians(degrees)
        th = torch.zeros(B, 2, 3)
        th[:, 0, 0], th[:, 0, 1], th[:, 1, 0], th[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        return th
    return AffineTransform(theta)


def compose(transforms: Sequence[Callable]):
    """Apply transforms in order; runs of AffineTransforms are fused into one resampling (the output grid of the
    later transform is mapped through the earlier ones: theta = theta_1 @ theta_2 @ ...)."""
    transforms = list(transforms)

    def fn(img, g):
        i = 0
        while i < len(transforms):
            t = transforms[i]
            if isinstance(t, AffineTransform):
                theta = _homogeneous(t.theta(img.shape[0], g))
                while i + 1 < len(transforms) and isinstance(transforms[i + 1], AffineTransform):
                    i += 1
                    theta = theta @ _homogeneous(transforms[i].theta(img.shape[0], g))
                img = _affine(img, theta[:, :2].to(img))
            else:
                img = t(img, g)
            i += 1
        return img
    return fn


def fit_size(img: Tensor, size: Sequence[int], value: float = 0.5) -> Tensor:
    """Centre-crop (or pad with grey) the transformed images back to `size` = (H, W): models with a fixed input
    geometry (CapsNet's primary-capsule grid, a linear layer on flattened maps) see the size they were built for;
    the random jitter before it still shifts the content."""
    H, W = int(size[0]), int(size[1])
    h, w = img.shape[-2:]
    if (h, w) == (H, W):
        return img
    if h < H or w < W:
        dh, dw = max(0, H - h), max(0, W - w)
        img = F.pad(img, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="constant", value=value)
        h, w = img.shape[-2:]
    top, left = (h - H) // 2, (w - W) // 2
    return img[..., top:top + H, left:left + W]


def standard_transforms(scale: float = 1.0):
    """pad 12, jitter 8, scale 0.9-1.1, rotate +-10 degrees, jitter 4 (lucid's defaults, for 224 px); `scale`
    shrinks the pixel amounts for small images (64 px: 64/224)."""
    p = lambda n: max(1, round(n * scale))  # noqa: E731
    return compose([pad(p(12)), jitter(p(8)), random_scale(), random_rotate(10.0), jitter(p(4))])


# ===================================================================================================================
# The optimisation
# ===================================================================================================================
class _StopForward(Exception):
    """Raised by the last needed hook: the layers above it are not needed for the objective."""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration (BatchNorm statistics must not mix the units' images), flags restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, t in modes.items():
            m.training = t


class _Context:
    def __init__(self):
        self.acts: dict[str, Tensor] = {}
        self.scores: Tensor | None = None


PRE_RELU = ":pre_relu"


def _hook_point(model: nn.Module, name: str) -> tuple[nn.Module, bool]:
    """(module, pre) for a layer name; "<layer>:pre_relu" is the input of the last nn.ReLU inside <layer>: a unit
    that is off (0 after the ReLU) on the initial image has zero gradient there, but not before the ReLU (the reason
    lucid optimises *_pre_relu layers)."""
    if not name.endswith(PRE_RELU):
        return resolve_layer(model, name), False
    base = name[: -len(PRE_RELU)]
    relus = [m for m in resolve_layer(model, base).modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"layer {base!r} has no nn.ReLU module, so {name!r} does not exist; use {base!r}")
    return relus[-1], True


def objective_forward(model: nn.Module, objective: Objective, x: Tensor) -> Tensor:
    """One forward pass with the objective's layers hooked -> objective value [B]; hooks removed in finally."""
    ctx = _Context()
    points = {name: _hook_point(model, name) for name in objective.layers}
    handles = []

    def record(name, value):
        ctx.acts[name] = value
        if not objective.needs_scores and len(ctx.acts) == len(points):
            raise _StopForward

    try:
        for name, (module, pre) in points.items():
            if pre:  # clone: an inplace ReLU would overwrite its input after this hook
                handles.append(module.register_forward_pre_hook(
                    lambda m, inputs, name=name: record(name, inputs[0].clone())))
            else:
                handles.append(module.register_forward_hook(lambda m, inputs, out, name=name: record(name, out)))
        try:
            scores = scores_fn_of(model)(x)
            ctx.scores = scores if objective.needs_scores else None
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = set(points) - set(ctx.acts)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} did not run in the model's forward pass")
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
    history = []
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        for _ in (progress(range(steps)) if progress else range(steps)):
            img = param()
            x = normalize(fit_size(transforms(img, g), img.shape[-2:]))
            value = objective_forward(model, objective, x)
            grads = torch.autograd.grad(-value.sum(), params)  # image parameters only: model .grad untouched
            for p, gr in zip(params, grads):
                p.grad = gr
            optimizer.step()
            history.append(float(value.detach().mean()))
        with torch.no_grad():
            images = param().detach()
    return images, {"objective": history}


@torch.no_grad()
def unit_activation(model: nn.Module, layer: str, images01: Tensor, units, normalize=None) -> Tensor:
    """Mean activation of channel units[i] of `layer` on (untransformed) image i -> [B]."""
    normalize = normalize or (lambda img: img)
    with eval_mode(model):
        return objective_forward(model, channel(layer, units), normalize(images01))


# ===================================================================================================================
# First-layer filters and maximally activating dataset patches
# ===================================================================================================================
def first_layer_filters(model: nn.Module) -> Tensor:
    """Weights of the first Conv2d as images [O, C, k, k] in [0, 1] (each filter scaled symmetrically about 0.5)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: no first-layer filters to show")
    w = conv.weight.detach().float().cpu()
    w = w[:, :3] if w.shape[1] >= 3 else w[:, :1]
    return w / (2 * w.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]) + 0.5


class TopActivations(NamedTuple):
    values: Tensor        # [k, U] the unit's maximum over the map, best images first
    indices: Tensor       # [k, U] dataset indices of those images
    positions: Tensor     # [k, U, 2] (row, col) of the maximum in the layer's map
    map_size: tuple       # (h, w) of the layer's map
    mean_sum: Tensor      # [U] sum over the images of the unit's mean activation (for the data set mean)
    count: int            # images seen


@torch.no_grad()
def top_activations(model: nn.Module, layer: str, batches, units: Sequence[int], k: int = 8,
                    index_offset: int = 0) -> TopActivations:
    """Per unit, the k images of `batches` (normalised image tensors in dataset order, the first at dataset index
    `index_offset`) where the unit's maximum activation is largest (see TopActivations). Vectorised over units and
    images; the running candidates are merged with one top-k per batch."""
    units_t = torch.as_tensor(list(units), dtype=torch.long)
    vals = idx = pos = None
    seen = index_offset
    layer_m = resolve_layer(model, layer)
    shape, mean_sum = None, 0.0
    for x in batches:
        captured = []
        handle = layer_m.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            scores_fn_of(model)(x)
        finally:
            handle.remove()
        a = captured[0][:, units_t.to(x.device)]  # [B, U, h, w]
        shape = a.shape[-2:]
        mean_sum = mean_sum + a.mean((2, 3)).sum(0)
        flat_max, flat_arg = a.flatten(2).max(2)  # [B, U]
        b_idx = torch.arange(seen, seen + len(x), device=x.device)[:, None].expand_as(flat_max)
        p = torch.stack([flat_arg // shape[1], flat_arg % shape[1]], -1)
        seen += len(x)
        if vals is None:
            vals, idx, pos = flat_max, b_idx, p
        else:
            vals, idx, pos = torch.cat([vals, flat_max]), torch.cat([idx, b_idx]), torch.cat([pos, p])
        top = vals.topk(min(k, len(vals)), dim=0)
        vals, idx = top.values, idx.gather(0, top.indices)
        pos = pos.gather(0, top.indices[..., None].expand(-1, -1, 2))
    if vals is None:
        raise ValueError("no images to search for top activations")
    return TopActivations(vals, idx, pos, tuple(shape), mean_sum, seen - index_offset)


def crop_patches(images01: Tensor, positions: Tensor, map_size: Sequence[int], patch: int) -> Tensor:
    """Patches [N, C, patch, patch] centred on the input location of each map position (row, col) [N, 2]."""
    N, C, H, W = images01.shape
    cy = ((positions[:, 0].float() + 0.5) * H / map_size[0]).round().long()
    cx = ((positions[:, 1].float() + 0.5) * W / map_size[1]).round().long()
    y0 = (cy - patch // 2).clamp(0, max(0, H - patch))
    x0 = (cx - patch // 2).clamp(0, max(0, W - patch))
    rows = (y0[:, None] + torch.arange(patch)).clamp(max=H - 1)  # [N, p]
    cols = (x0[:, None] + torch.arange(patch)).clamp(max=W - 1)
    n = torch.arange(N)[:, None, None]
    return images01.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def save_grid(images01: Tensor, path, nrow: int, upscale: int = 1) -> None:
    from torchvision.utils import save_image
    img = images01.detach().float().cpu().clamp(0, 1)
    if upscale > 1:
        img = img.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    save_image(img, str(path), nrow=nrow, padding=2, pad_value=1.0)


# ===================================================================================================================
# The callback
# ===================================================================================================================
# A unit that is exactly 0 (off after its ReLU) on the initial grey image has gain final / GAIN_FLOOR.
GAIN_FLOOR = 1e-6


class FeatureVisualizationCallback(InterpretationCallback):
    """Every `every_n_epochs` (and after the last epoch): feature visualizations of the first `num_units` channels of
    `layer` (and the class logits when `classes` is true), the units split over ranks, `steps` Adam steps each;
    the first-layer filter grid; the top-`k_patches` activating probe patches per unit (probe images sharded, the
    candidates gathered). Rank 0 writes units.png / classes.png / filters.png / patches.png and featviz.json.

    Units are optimised before the layer's last ReLU (`pre_relu`) and measured after it. Metrics:
    interp/featviz/activation_gain_{min,median} (final / initial mean channel activation on the untransformed image,
    the initial one floored at GAIN_FLOOR), interp/featviz/activation_final_mean, and
    interp/featviz/activation_vs_data_min (final / the unit's mean activation over the probe images)."""

    name = "featviz"

    def __init__(self, layer: str | None = None, num_units: int = 8, classes: bool = True, steps: int = 64,
                 lr: float = 0.05, parametrisation: str = "fourier", decorrelate: bool = True,
                 transforms: bool = True, pre_relu: bool = True, k_patches: int = 6,
                 patch_size: int | None = None, max_images: int = 256,
                 split: str = "val", seed: int = 0, **kwargs):
        kwargs.setdefault("every_n_epochs", 4)
        super().__init__(**kwargs)
        if parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"callbacks.featviz.parametrisation={parametrisation!r}: choose from "
                             f"{', '.join(PARAMETRISATIONS)}")
        if steps < 1 or num_units < 1:
            raise ValueError("callbacks.featviz.steps and num_units must be >= 1")
        self.layer, self.num_units, self.classes, self.steps, self.lr = layer, int(num_units), classes, steps, lr
        self.parametrisation, self.decorrelate, self.transforms = parametrisation, decorrelate, transforms
        self.pre_relu = pre_relu
        self.k_patches, self.patch_size, self.max_images = int(k_patches), patch_size, int(max_images)
        self.split, self.seed = split, seed

    def _layer_name(self, module) -> str:
        name = self.layer or getattr(module, "default_probe_layer", None)
        if not name:
            raise ValueError("callbacks.featviz.layer: the model names no default probe layer; set one")
        resolve_layer(module, name)  # unknown names list the valid ones
        return name

    def _probe_images(self, trainer):
        dm = self.datamodule(trainer)
        probe = dm.probe_dataset(self.split) if hasattr(dm, "probe_dataset") else None
        if probe is not None:
            ds = probe
            get = lambda item: (item["image"], item.get("raw"))  # noqa: E731
        else:
            ds = (dm.val_dataloader() if self.split == "val" else dm.test_dataloader()).dataset
            get = lambda item: (item[0], None)  # noqa: E731
        return torch.utils.data.Subset(ds, range(min(len(ds), self.max_images))), get

    def run(self, trainer, module, epoch):
        device = module.device
        dm = self.datamodule(trainer)
        layer = self._layer_name(module)
        normalize = getattr(dm, "normalize", None)
        ds, get = self._probe_images(trainer)

        # ---- units (and classes) as one batch per rank -------------------------------------------------------
        with torch.no_grad():
            x0 = get(ds[0])[0][None].to(device)
            captured = []
            h = resolve_layer(module, layer).register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                n_classes = scores_fn_of(module)(x0).shape[1]
            finally:
                h.remove()
        units_all = list(range(min(self.num_units, captured[0].shape[1])))
        jobs = [("unit", u) for u in units_all] + ([("class", c) for c in range(n_classes)] if self.classes else [])
        mine = [jobs[i] for i in D.shard_indices(len(jobs))]
        channels, size = x0.shape[1], x0.shape[-1]
        colour_sqrt = self._colour_sqrt(ds, get) if channels == 3 and self.decorrelate else None
        result = torch.zeros(len(mine), 2, device=device)  # initial, final activation (or class score)
        images = torch.zeros(len(mine), channels, size, size, device=device)
        if mine:
            gen = torch.Generator().manual_seed(self.seed + 7919 * D.rank())
            param = PARAMETRISATIONS[self.parametrisation](len(mine), channels, size, decorrelate=self.decorrelate,
                                                          colour_sqrt=colour_sqrt, device=device, generator=gen)
            # optimised before the layer's last ReLU (units off at the start still get a gradient); measured after
            # it, as the unit's activation
            target = f"{layer}{PRE_RELU}" if self.pre_relu and self._has_relu(module, layer) else layer
            objective, measure = self._objective(target, mine), self._objective(layer, mine)
            with torch.no_grad():
                result[:, 0] = objective_forward(module, measure, self._norm(normalize, param()))
            transforms = standard_transforms(size / 224) if self.transforms else None
            images, _ = visualize(module, objective, param, transforms, self.steps, self.lr,
                                  lambda img: self._norm(normalize, img), seed=self.seed + D.rank(),
                                  progress=lambda it: self.progress(it, "optimise", total=self.steps))
            with torch.no_grad():
                result[:, 1] = objective_forward(module, measure, self._norm(normalize, images))
        result, images = D.all_gather_cat(result), D.all_gather_cat(images)

        # ---- maximally activating patches: probe images sharded, candidates gathered --------------------------
        shard = self.shard(ds)
        offset = shard.indices[0] if len(shard.indices) else 0
        batches = (torch.stack([get(shard[j])[0] for j in range(s, min(s + self.batch_size, len(shard)))]).to(device)
                   for s in range(0, len(shard), self.batch_size))
        k = min(self.k_patches, len(ds))
        mean_sum = torch.zeros(len(units_all), device=device)
        if len(shard):
            top = top_activations(module, layer, batches, units_all, k, index_offset=offset)
            vals, idx, pos, map_size, mean_sum = top.values, top.indices, top.positions, top.map_size, top.mean_sum
        else:
            vals = torch.full((0, len(units_all)), -float("inf"), device=device)
            idx = torch.zeros(0, len(units_all), dtype=torch.long, device=device)
            pos = torch.zeros(0, len(units_all), 2, dtype=torch.long, device=device)
            map_size = tuple(captured[0].shape[-2:])
        vals, idx, pos = D.all_gather_cat(vals), D.all_gather_cat(idx), D.all_gather_cat(pos)
        data_mean = D.all_reduce_sum(mean_sum) / max(1, len(ds))  # mean channel activation over the probe images
        top = vals.topk(min(k, len(vals)), dim=0)
        idx = idx.gather(0, top.indices)
        pos = pos.gather(0, top.indices[..., None].expand(-1, -1, 2))

        unit_rows = [i for i, j in enumerate(jobs) if j[0] == "unit"]
        gains = (result[unit_rows, 1] / result[unit_rows, 0].clamp_min(GAIN_FLOOR)).cpu()
        vs_data = (result[unit_rows, 1] / data_mean.clamp_min(GAIN_FLOOR)).cpu()
        metrics = {"activation_gain_min": float(gains.min()), "activation_gain_median": float(gains.median()),
                   "activation_final_mean": float(result[unit_rows, 1].mean()),
                   "activation_vs_data_min": float(vs_data.min())}
        if self.is_rank_zero:
            self._render(trainer, module, epoch, layer, jobs, result, images, ds, get, idx, pos, map_size,
                         top.values, metrics, data_mean)
        return metrics

    @staticmethod
    def _has_relu(module, layer) -> bool:
        return any(isinstance(m, nn.ReLU) for m in resolve_layer(module, layer).modules())

    @staticmethod
    def _norm(normalize, img):
        return normalize(img) if normalize is not None else img

    @staticmethod
    def _objective(layer: str, mine: list[tuple[str, int]]) -> Objective:
        units = [(i, v) for i, (kind, v) in enumerate(mine) if kind == "unit"]
        classes = [(i, v) for i, (kind, v) in enumerate(mine) if kind == "class"]
        obj = None
        # units come first and classes after them in every shard (jobs are ordered that way)
        if units:
            obj = channel(layer, [v for _, v in units], offset=units[0][0])
        if classes:
            c = class_logit([v for _, v in classes], offset=classes[0][0])
            obj = c if obj is None else obj + c
        return obj

    def _colour_sqrt(self, ds, get) -> Tensor | None:
        raws = [get(ds[i])[1] for i in range(min(len(ds), 64))]
        if any(r is None for r in raws):
            return None
        return colour_correlation_sqrt(torch.stack(raws))

    def _render(self, trainer, module, epoch, layer, jobs, result, images, ds, get, idx, pos, map_size, top_vals,
                metrics, data_mean):
        out = self.epoch_dir(trainer, epoch)
        paths = []
        unit_rows = [i for i, j in enumerate(jobs) if j[0] == "unit"]
        class_rows = [i for i, j in enumerate(jobs) if j[0] == "class"]
        save_grid(images[unit_rows], out / "units.png", nrow=8, upscale=2)
        paths.append(out / "units.png")
        if class_rows:
            save_grid(images[class_rows], out / "classes.png", nrow=8, upscale=2)
            paths.append(out / "classes.png")
        filters = first_layer_filters(module)
        save_grid(filters, out / "filters.png", nrow=16, upscale=max(1, 24 // filters.shape[-1]))
        paths.append(out / "filters.png")
        if idx.numel():
            flat_idx = idx.T.flatten().tolist()  # unit-major: one row of k patches per unit
            raws = []
            dm = self.datamodule(trainer)
            for i in flat_idx:
                x, raw = get(ds[i])
                raws.append(raw if raw is not None else (dm.denormalize(x[None])[0] if hasattr(dm, "denormalize")
                                                          else x))
            H = raws[0].shape[-1]
            patch = self.patch_size or max(8, H // 2)
            patches = crop_patches(torch.stack(raws).float().cpu(), pos.transpose(0, 1).reshape(-1, 2).cpu(),
                                   map_size, min(patch, H))
            save_grid(patches, out / "patches.png", nrow=idx.shape[0], upscale=max(1, 48 // patch))
            paths.append(out / "patches.png")
        names = getattr(self.datamodule(trainer), "class_names", None)
        write_json(out / "featviz.json", {
            "epoch": epoch, "layer": layer, "steps": self.steps, "parametrisation": self.parametrisation,
            "metrics": metrics,
            "units": [{"kind": kind, "index": v, "name": (names[v] if kind == "class" and names else None),
                       "initial": float(result[i, 0]), "final": float(result[i, 1]),
                       "data_mean": float(data_mean[v]) if kind == "unit" else None,
                       "gain": (float(result[i, 1] / max(float(result[i, 0]), GAIN_FLOOR)) if kind == "unit"
                                else None)}
                      for i, (kind, v) in enumerate(jobs)],
            "top_patches": {"dataset_index": idx.T.tolist(), "position": pos.transpose(0, 1).tolist(),
                            "activation": top_vals.T.tolist(), "map_size": list(map_size)}})
        self.log_images(trainer, "grids", paths, [p.stem for p in paths])
