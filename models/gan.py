"""A DCGAN (Radford et al. 2016) for the image data sets, at their native size, trained with Lightning's manual
optimisation (one D step, then one G step per batch; both optimisers are checkpointed, so runs resume).

`ema_decay` (e.g. 0.999) keeps an exponential moving average of the generator's weights (Yazici et al., ICLR 2019),
`generator_ema`: it is what the model samples, validates and offers for interpretation (`generate`, the probe layers,
the latent affine map), while `generator` is the one trained; its batch-norm statistics are re-estimated for its own
weights before every validation (`recalibrate`, fixed latents), and val/fd_raw is the trained generator's FD.

Generator: z -> `stem` (Linear + BN + ReLU to a 4x4 map: the affine first step SeFa reads) -> `block1..blockN`
(ConvTranspose 4x4 stride 2 + BN + ReLU, doubling the size) -> `to_rgb` (ConvTranspose + tanh) -> images in [0, 1].
Discriminator: the mirror with LeakyReLU(0.2). Loss: the non-saturating GAN loss. `hessian_penalty` > 0 adds the
Hessian penalty of G(z) w.r.t. z (Peebles et al. 2020, algorithms/gan/hessian.py) to the generator loss.

The model offers `GenerativeModel` (core/protocol.py): probe layers = the generator's stages; `concept_segmenter` =
the trained segmenter loaded from `segmenter` (a checkpoint of models/segmenter.py), which also measures the
generation quality every validation epoch: val/fd (the Fréchet distance of generated vs real validation images in
the segmenter's feature space) and val/concept_freq_l1 (mean |frequency generated - real| of the concepts)."""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn

from core import distributed as D
from core.errors import ConfigError
from models.ddp import allow_unused_parameters
from models.gan_metrics import frechet_distance
from models.hessian_penalty import hessian_penalty
from models.segmenter import ConceptSegmenterModule

#: a concept counts as present in an image when the segmenter labels at least this share of its pixels
PRESENT_SHARE = 0.005


def up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def down_block(cin: int, cout: int, norm: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2, True))


class Generator(nn.Module):
    def __init__(self, latent_dim: int, widths: Sequence[int], channels: int, image_size: int):
        super().__init__()
        w = [int(x) for x in widths]
        self.stem = nn.Sequential(nn.Linear(latent_dim, w[0] * 16), nn.Unflatten(1, (w[0], 4, 4)),
                                  nn.BatchNorm2d(w[0]), nn.ReLU(True))
        self.blocks = nn.ModuleList([up_block(a, b) for a, b in zip(w, w[1:])])
        self.to_rgb = nn.Sequential(nn.ConvTranspose2d(w[-1], channels, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z)
        for block in self.blocks:
            h = block(h)
        return (self.to_rgb(h) + 1) / 2


class Discriminator(nn.Module):
    def __init__(self, widths: Sequence[int], channels: int):
        super().__init__()
        w = [int(x) for x in widths]
        self.blocks = nn.Sequential(down_block(channels, w[0], norm=False),
                                    *[down_block(a, b) for a, b in zip(w, w[1:])])
        self.head = nn.Conv2d(w[-1], 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x * 2 - 1)).flatten()


def check_sizes(image_size: int, g_widths: Sequence[int], d_widths: Sequence[int]) -> None:
    need = 4 * 2 ** len(g_widths)
    if need != image_size:
        raise ConfigError(f"model.g_widths has {len(g_widths)} entries, which generate {need}x{need} images; "
                          f"datamodule.image_size={image_size} needs {int(math.log2(image_size / 4))} entries")
    if 4 * 2 ** len(d_widths) != image_size:
        raise ConfigError(f"model.d_widths has {len(d_widths)} entries; datamodule.image_size={image_size} needs "
                          f"{int(math.log2(image_size / 4))} (each halves the size, down to 4x4)")


def load_segmenter(path: str | None, option: str = "model.segmenter") -> ConceptSegmenterModule | None:
    if path is None:
        return None
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"{option}={path}: no such checkpoint. Train the segmenter first: "
                          f"`python train.py model=segmenter`, then pass {option}=<that run>/checkpoints/last.ckpt")
    # the project's own checkpoint (its hyper-parameters hold config objects, which weights_only refuses)
    net = ConceptSegmenterModule.load_from_checkpoint(str(p), map_location="cpu", weights_only=False)
    net.eval().requires_grad_(False)
    return net


class GAN(LightningModule):
    default_probe_layer = "block1"

    def __init__(self, channels: int = 3, image_size: int = 64, latent_dim: int = 64,
                 g_widths: Sequence[int] = (128, 64, 32, 16), d_widths: Sequence[int] = (16, 32, 64, 128),
                 segmenter: str | None = None, hessian_penalty: float = 0.0, hessian_samples: int = 2,
                 hessian_eps: float = 0.1, hessian_batch: int = 16, fd_samples: int = 1000,
                 ema_decay: float | None = None, ema_recalibration_batches: int = 8,
                 optimizer: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        check_sizes(int(image_size), g_widths, d_widths)
        if float(hessian_penalty) < 0:
            raise ConfigError(f"model.hessian_penalty={hessian_penalty}: a weight >= 0 (0 = off)")
        self.latent_dim = int(latent_dim)
        self.generator = Generator(self.latent_dim, g_widths, int(channels), int(image_size))
        self.discriminator = Discriminator(d_widths, int(channels))
        self.hessian_weight = float(hessian_penalty)
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay}: a decay in (0, 1), e.g. 0.999 (null = no EMA generator)")
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        # the averaged generator: a submodule, so checkpoints and resume carry it; never trained by an optimiser
        self.generator_ema = (copy.deepcopy(self.generator).requires_grad_(False) if self.ema_decay is not None
                              else None)
        self.optimizer_factory = optimizer
        # kept outside the module tree: not trained, not in the GAN's checkpoint (it is its own checkpoint)
        self._segmenter = [load_segmenter(segmenter)]
        self._val_real: list[torch.Tensor] = []

    # ----- GenerativeModel (core/protocol.py) ---------------------------------------------------------------------
    @property
    def sampler(self) -> Generator:
        """The generator that samples, is validated and is interpreted: the EMA one when `ema_decay` is set."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        g = self.sampler
        return OrderedDict([("stem", g.stem)] + [(f"block{i + 1}", b) for i, b in enumerate(g.blocks)])

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return self.sampler(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.sampler(z)

    def latent_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        fc = self.sampler.stem[0]
        return fc.weight, fc.bias

    # ----- the EMA generator --------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * trained, every parameter in one fused call."""
        ema = list(self.generator_ema.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.generator.parameters()], 1.0 - self.ema_decay)

    @torch.no_grad()
    def recalibrate(self) -> None:
        """Re-estimate the EMA generator's batch-norm statistics for its own weights (the averaged weights never ran
        with the trained generator's statistics): the exact mean over `ema_recalibration_batches` batches of 64
        fixed latents, in train mode. Deterministic, and leaves the global random stream alone."""
        g = self.generator_ema
        norms = [m for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        saved = [(m.momentum, m.training) for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None           # cumulative average
            m.train()
        rng = torch.Generator().manual_seed(4321)
        for _ in range(int(self.hparams.ema_recalibration_batches)):
            g(torch.randn(64, self.latent_dim, generator=rng).to(self.device))
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)

    @property
    def concept_segmenter(self) -> ConceptSegmenterModule | None:
        net = self._segmenter[0]
        if net is not None and next(net.parameters()).device != self.device:
            net.to(self.device)
        return net

    # ----- training -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # the discriminator step never reaches the generator: DDP must be told (it refused the GAN before)
        allow_unused_parameters(self._trainer, stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        if mean is not None and (any(float(m) != 0.0 for m in mean) or any(float(s) != 1.0 for s in std)):
            raise ConfigError("model=gan generates images in [0, 1]: set datamodule.normalize=false "
                              "(conf/model/gan.yaml does)")

    def training_step(self, batch, batch_idx):
        real = batch[0] if isinstance(batch, (list, tuple)) else batch["raw"]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), self.latent_dim, device=real.device)
        fake = self.generator(z)
        # D: softplus(-D(x)) + softplus(D(G(z))) is the GAN loss -log sigma(D(x)) - log(1 - sigma(D(G(z))))
        d_loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        # G: the non-saturating loss -log sigma(D(G(z)))
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        loss = g_loss
        if self.hessian_weight > 0:
            n = min(int(self.hparams.hessian_batch), len(z))
            hp = hessian_penalty(self.generator, z[:n], k=int(self.hparams.hessian_samples),
                                 eps=float(self.hparams.hessian_eps), g0=fake[:n])
            loss = loss + self.hessian_weight * hp
            self.log("train/hessian_penalty", hp.detach(), on_step=False, on_epoch=True)
        bad = D.agree_any(not bool(torch.isfinite(loss.detach()) & torch.isfinite(d_loss.detach())),
                          device=loss.device)
        if bad:
            raise FloatingPointError(f"GAN loss became non-finite at step {self.global_step} (d_loss={float(d_loss)}"
                                     f", g_loss={float(g_loss)}); lower model.optimizer.lr")
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_g.step()
        if self.generator_ema is not None:
            self.update_ema()
        self.log("train/d_loss", d_loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/g_loss", g_loss.detach(), on_step=True, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        seg = self.concept_segmenter
        if seg is None:
            return
        real = batch[0] if isinstance(batch, (list, tuple)) else batch["raw"]
        self._val_real.append(self._measure(seg, real))

    def _measure(self, seg, images: torch.Tensor) -> torch.Tensor:
        """[B, F + C + 1]: segmenter features and concept presence of each image."""
        present = (seg.concept_probabilities(images) > 0.5).float().mean(dim=(2, 3)) > PRESENT_SHARE
        return torch.cat([seg.embedding(images), present.float()], 1)

    def on_validation_epoch_start(self):
        if self.generator_ema is not None:
            self.recalibrate()

    def on_validation_epoch_end(self):
        seg = self.concept_segmenter
        if seg is None or not self._val_real:
            return
        real = D.all_gather_cat(torch.cat(self._val_real))
        self._val_real = []
        g = torch.Generator().manual_seed(1234)   # the same latents every epoch
        z = torch.randn(min(int(self.hparams.fd_samples), len(real)), self.latent_dim, generator=g).to(self.device)
        fake = torch.cat([self._measure(seg, self.sampler(zb)) for zb in z.split(128)])
        f = real.shape[1] - len(seg.concept_names)    # [features | presence of concepts 0..C]
        self.log("val/fd", frechet_distance(real[:, :f], fake[:, :f]), prog_bar=True)
        if self.generator_ema is not None:   # the trained generator, for comparison
            raw = torch.cat([seg.embedding(self.generator(zb)) for zb in z.split(128)])
            self.log("val/fd_raw", frechet_distance(real[:, :f], raw))
        freq_real, freq_fake = real[:, f + 1:].mean(0), fake[:, f + 1:].mean(0)   # concept 0 (unlabelled) dropped
        self.log("val/concept_freq_l1", float((freq_real - freq_fake).abs().mean()))
        names = seg.concept_names
        for c in range(len(freq_fake)):
            self.log(f"val/concept_freq/{names[c + 1]}", float(freq_fake[c]))

    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999)))
        return [factory(params=self.generator.parameters()), factory(params=self.discriminator.parameters())]
