"""CapsNet with dynamic routing (Sabour, Frosst & Hinton, NeurIPS 2017), `model=capsnet`.

conv1 (256 x 9x9, ReLU) -> PrimaryCaps (types x 8D, 9x9 stride 2, squashed) -> class capsules (num_classes x 16D,
one 8x16 transform W_ij per (primary capsule i, class j), routing by agreement) -> class scores = capsule lengths.
Loss = margin loss (Eq. 4) + 0.0005 * reconstruction SSE of a decoder (FC 512 -> 1024 -> pixels, sigmoid) fed with
the class capsules masked to the true class in training and to the predicted class otherwise.

Grid sizes follow from the input: 28x28x1 (MNIST) -> 20x20 -> 6x6x32 = 1152 primary capsules; 32x32x3 (the paper's
CIFAR-10 variant, 64 primary capsule types) -> 24x24 -> 8x8x64 = 4096.
Shift augmentation (random translations of up to 2 pixels, zero padded, the paper's only augmentation) is set in
conf/model/capsnet.yaml as `datamodule.shift: 2`; `model.shift_pixels` does the same inside `model_step` (vectorised,
per image) for data without augmentation. Either way the reconstruction target is the shifted image the network saw.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ClassifierModule
from core.errors import ConfigError
from models.routing import dynamic_routing, squash


class _StridedConvFunction(torch.autograd.Function):
    """conv2d (no padding, no dilation) whose backward splits the strided convolution into its stride x stride
    polyphase components: each is a stride-1 convolution, which oneDNN runs about 1.4x faster than the strided
    backward kernels (the PrimaryCaps 9x9 stride-2 convolution is most of a CapsNet training step). Same
    mathematics; the gradients equal F.conv2d's to float rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return F.conv2d(x, weight, bias, stride=stride)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        B, C, H, W = x.shape
        O, _, kh, kw = weight.shape
        h, w = grad_out.shape[-2:]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = x.new_zeros(B, C, H, W) if need_x else None
        grad_w = weight.new_zeros(O, C, kh, kw) if need_w else None
        g_t = grad_out.transpose(0, 1) if need_w else None
        # phase (a, b): kernel taps w[:, :, a::s, b::s] meet input pixels x[:, :, a::s, b::s] at stride 1
        for a in range(min(s, kh)):
            for b in range(min(s, kw)):
                w_ab = weight[:, :, a::s, b::s]
                ka, kb = w_ab.shape[-2:]
                if need_x:
                    g = F.conv_transpose2d(grad_out, w_ab.contiguous())               # [B, C, h+ka-1, w+kb-1]
                    grad_x[:, :, a::s, b::s][:, :, :g.shape[2], :g.shape[3]] = g
                if need_w:
                    x_ab = x[:, :, a::s, b::s][:, :, :h + ka - 1, :w + kb - 1]
                    grad_w[:, :, a::s, b::s] = F.conv2d(x_ab.transpose(0, 1), g_t).transpose(0, 1)
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class PolyphaseConv2d(nn.Conv2d):
    """nn.Conv2d (padding 0, dilation 1, groups 1) with the polyphase backward of `_StridedConvFunction`; a module,
    so forward hooks of interpretation callbacks still see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        if stride == 1 or self.stride[0] != self.stride[1] or not torch.is_grad_enabled():
            return super().forward(x)
        return _StridedConvFunction.apply(x, self.weight, self.bias, stride)


@dataclass
class CapsuleOutput:
    """Everything one CapsNet forward pass produces (the loss needs all of it, callbacks some of it)."""
    lengths: torch.Tensor          # [B, K] class capsule lengths = class scores
    poses: torch.Tensor            # [B, K, 16] class capsule vectors v_j
    reconstruction: torch.Tensor | None   # [B, C, H, W] in [0, 1]
    target: torch.Tensor | None    # [B, C, H, W] the input in [0, 1] (reconstruction target)
    couplings: torch.Tensor        # [B, I, K] final coupling coefficients c_ij
    masked_class: torch.Tensor     # [B] the class the decoder was fed


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                down_weight: float = 0.5) -> torch.Tensor:
    """Eq. 4: L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2, summed over classes k and
    averaged over the batch."""
    t = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)
    present = t * F.relu(m_plus - lengths).pow(2)
    absent = down_weight * (1.0 - t) * F.relu(lengths - m_minus).pow(2)
    return (present + absent).sum(dim=1).mean()


def mask_poses(poses: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Zero every class capsule but `classes` (Sec. 4.1) and flatten to the decoder's input [B, K * D]."""
    mask = F.one_hot(classes, poses.shape[1]).to(poses.dtype)
    return (poses * mask.unsqueeze(-1)).flatten(1)


def random_shift(x: torch.Tensor, max_shift: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Translate every image by its own random (dy, dx) in [-max_shift, max_shift]^2 with `fill` padding, by one
    gather (no loop over images)."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    p = max_shift
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    padded = F.pad(x - fill, (p, p, p, p)) + fill
    offset = torch.randint(0, 2 * p + 1, (2, B), device=x.device)
    rows = (offset[0, :, None] + torch.arange(H, device=x.device))[:, None, :, None].expand(B, C, H, W)
    cols = (offset[1, :, None] + torch.arange(W, device=x.device))[:, None, None, :].expand(B, C, H, W)
    flat = padded.flatten(2)
    index = (rows * (W + 2 * p) + cols).flatten(2)
    return flat.gather(2, index).view(B, C, H, W)


class CapsNet(ClassifierModule):
    """`model=capsnet`: forward(x) returns the class scores (capsule lengths); `capsules(x, labels)` everything."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28, conv_channels: int = 256,
                 kernel_size: int = 9, primary_types: int | None = None, primary_dim: int = 8,
                 primary_stride: int = 2, class_dim: int = 16, routing_iterations: int = 3,
                 detach_votes: bool = True, reconstruction: bool = True, reconstruction_weight: float = 0.0005,
                 decoder_widths: Sequence[int] = (512, 1024), m_plus: float = 0.9, m_minus: float = 0.1,
                 down_weight: float = 0.5, shift_pixels: int = 0, mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None, **kwargs):
        super().__init__(num_classes=num_classes, channels=channels, image_size=image_size, **kwargs)
        self.save_hyperparameters(logger=False)
        if int(routing_iterations) < 1:
            raise ConfigError(f"model.routing_iterations={routing_iterations}: dynamic routing needs at least 1 "
                              f"iteration (the paper uses 3)")
        if int(shift_pixels) < 0:
            raise ConfigError(f"model.shift_pixels={shift_pixels}: must be >= 0 (the paper shifts by up to 2)")
        conv_size = self.image_size - kernel_size + 1
        grid = (conv_size - kernel_size) // primary_stride + 1 if conv_size >= kernel_size else 0
        if grid < 1:
            raise ConfigError(
                f"datamodule.image_size={image_size} does not fit the primary-capsule grid: conv1 ({kernel_size}x"
                f"{kernel_size}) gives {max(conv_size, 0)}x{max(conv_size, 0)} and PrimaryCaps ({kernel_size}x"
                f"{kernel_size}, stride {primary_stride}) needs at least {kernel_size}x{kernel_size}; use "
                f"datamodule.image_size >= {2 * kernel_size - 1} (28 for MNIST-like data, 32 for CIFAR-like)")
        self.routing_iterations = int(routing_iterations)
        self.detach_votes = bool(detach_votes)
        self.reconstruction = bool(reconstruction)
        self.reconstruction_weight = float(reconstruction_weight)
        self.m_plus, self.m_minus, self.down_weight = float(m_plus), float(m_minus), float(down_weight)
        self.shift_pixels = int(shift_pixels)
        # the paper's CIFAR-10 variant: same network, 3 input channels, 64 primary capsule types
        self.primary_types = int(primary_types or (32 if self.channels == 1 else 64))
        self.primary_dim, self.class_dim = int(primary_dim), int(class_dim)
        self.grid_size = grid
        self.num_primary = self.primary_types * grid * grid

        self.conv1 = nn.Conv2d(self.channels, conv_channels, kernel_size)
        self.primary = PolyphaseConv2d(conv_channels, self.primary_types * self.primary_dim, kernel_size,
                                 stride=primary_stride)
        # W_ij: one 8x16 matrix per (primary capsule i, class j), stored [I, 8, J * 16] so that all votes are one
        # batched matmul over i: [I, B, 8] @ [I, 8, J*16]
        self.transforms = nn.Parameter(0.01 * torch.randn(self.num_primary, self.primary_dim,
                                                          self.num_classes * self.class_dim))
        pixels = self.channels * self.image_size ** 2
        widths = [self.num_classes * self.class_dim, *map(int, decoder_widths)]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*layers, nn.Linear(widths[-1], pixels), nn.Sigmoid())
        # input normalisation of the data, to compare reconstructions (in [0, 1]) with the input; taken from the
        # datamodule in setup() when not configured, and saved with the checkpoint
        self.register_buffer("data_mean", self._channel_stats(mean, 0.0))
        self.register_buffer("data_std", self._channel_stats(std, 1.0))
        self._stats_from_config = mean is not None and std is not None
        self.default_probe_layer = "primary"

    def _channel_stats(self, value, default: float) -> torch.Tensor:
        t = torch.as_tensor(default if value is None else value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.expand(self.channels)
        if t.numel() != self.channels:
            raise ConfigError(f"model.mean/model.std: {t.numel()} values for {self.channels} channels")
        return t.clone().reshape(1, self.channels, 1, 1)

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if not self._stats_from_config and dm is not None and hasattr(dm, "mean") and hasattr(dm, "std"):
            self.data_mean.copy_(self._channel_stats(dm.mean, 0.0))
            self.data_std.copy_(self._channel_stats(dm.std, 1.0))

    # ----- network ------------------------------------------------------------------------------------------
    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """u_i [B, I, 8], i ordered (type, row, col) so that c[:, i] reshapes to [types, grid, grid]."""
        h = self.primary(F.relu(self.conv1(x)))
        B = h.shape[0]
        u = h.view(B, self.primary_types, self.primary_dim, self.grid_size, self.grid_size)
        return squash(u.permute(0, 1, 3, 4, 2).reshape(B, self.num_primary, self.primary_dim))

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """u_hat_{j|i} = W_ij u_i for all (i, j) by one batched matmul; returned as [B, J, I, 16] for routing."""
        B = u.shape[0]
        uh = torch.bmm(u.transpose(0, 1), self.transforms)                  # [I, B, J*16]
        return uh.view(self.num_primary, B, self.num_classes, self.class_dim).permute(1, 2, 0, 3)

    def route(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dynamic_routing(self.votes(u).contiguous(), self.routing_iterations, self.detach_votes)

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.data_std + self.data_mean).clamp(0.0, 1.0)

    def decode(self, poses: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, C, H, W] in [0, 1] from the class capsules masked to `classes`."""
        out = self.decoder(mask_poses(poses, classes))
        return out.view(-1, self.channels, self.image_size, self.image_size)

    def capsules(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                 reconstruct: bool | None = None) -> CapsuleOutput:
        """The full forward pass. The decoder is fed the capsule of `labels` when given (training) and of the
        predicted class otherwise."""
        poses, couplings = self.route(self.primary_capsules(x))
        lengths = poses.norm(dim=-1)
        masked = labels if labels is not None else lengths.argmax(dim=1)
        recon = target = None
        if self.reconstruction if reconstruct is None else reconstruct:
            recon = self.decode(poses, masked)
            target = self.to_unit_range(x)
        return CapsuleOutput(lengths, poses, recon, target, couplings, masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.capsules(x, reconstruct=False).lengths

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict([("conv1", self.conv1), ("primary", self.primary)])

    # ----- training -----------------------------------------------------------------------------------------
    def model_step(self, batch, stage: str):
        x, y = batch[0], batch[1]
        if stage == "train" and self.shift_pixels > 0:
            # pad with the normalised value of a black pixel, i.e. zero padding of the raw image
            x = random_shift(x, self.shift_pixels, fill=(-self.data_mean / self.data_std).flatten())
        outputs = self.capsules(x, labels=y if stage == "train" else None)
        loss, terms = self.compute_loss(outputs, y, stage)
        return loss, terms, self.logits_from_outputs(outputs), y

    def compute_loss(self, outputs: CapsuleOutput, y: torch.Tensor, stage: str):
        margin = margin_loss(outputs.lengths, y, self.m_plus, self.m_minus, self.down_weight)
        terms = {"margin_loss": margin.detach()}
        loss = margin
        if outputs.reconstruction is not None:
            # sum of squared errors per image (Sec. 4.1), averaged over the batch
            sse = (outputs.reconstruction - outputs.target).pow(2).flatten(1).sum(1).mean()
            terms["reconstruction_loss"] = sse.detach()
            if self.reconstruction_weight > 0:
                loss = loss + self.reconstruction_weight * sse
        return loss, terms

    def logits_from_outputs(self, outputs: CapsuleOutput) -> torch.Tensor:
        return outputs.lengths
