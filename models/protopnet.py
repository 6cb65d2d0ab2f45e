"""ProtoPNet (Chen et al., "This Looks Like That", NeurIPS 2019): `model=protopnet`.

backbone -> add-on layers -> squared-L2 distances to m prototypes at every 1x1 patch -> min-pooling -> similarity
-> last layer. Training follows the paper's three stages, expressed as a per-epoch schedule inside trainer.max_epochs:
warm (backbone frozen), joint (all but the last layer), and after each push (prototype projection, see
models/protopnet_push.py) the last-layer phase: by default the convex problem of the paper solved to its optimum on
the training similarities right after the push (models/protopnet_last_layer.py), or, as in the public code, Adam
epochs on the last layer only. Each phase has its own optimiser (manual optimisation), so every
phase steps exactly its parameter groups with the learning rates of the public code; phase and push history travel
in the checkpoint, so a resumed run continues the same phase.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from core import distributed as D
from core.errors import ConfigError
from models.backbones import build_backbone
from models.base import ClassifierModule
from models.ddp import allow_unused_parameters
from models.protopnet_last_layer import (LastLayerSettings, fit_last_layer, off_class_mask, same_on_every_rank,
                                         training_similarities)
from models.protopnet_push import PushResult, k_nearest_patches, push_prototypes, shard_loader
from models.prototype_layer import (LOG_SIMILARITY_EPS, SIMILARITIES, SimilarityMaps,  # noqa: F401 (re-exported)
                                    distance_to_similarity, masked_min, squared_distances)

log = logging.getLogger(__name__)

PHASES = ("warm", "joint", "last_layer")
GROUPS = ("backbone", "add_on", "prototypes", "last_layer")
# A 1x1 map makes every prototype a whole-image prototype: the push boxes and "this looks like that" lose meaning.
MIN_FEATURE_SIZE = 2


# ----- the prototype layer (models/prototype_layer.py; shared with the push) ----------------------------------------
class AddOnLayers(nn.Sequential):
    """1x1 conv (C -> D) + ReLU + 1x1 conv (D -> D) + Sigmoid: patch features in [0, 1]^D."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__(nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


@dataclass
class PrototypeOutputs:
    logits: torch.Tensor          # [B, K]
    min_distances: torch.Tensor   # [B, m]
    similarities: torch.Tensor    # [B, m]


# ----- the training schedule -----------------------------------------------------------------------------------------
@dataclass
class ProtoPNetSchedule:
    """Which phase every Lightning epoch trains, and the epochs that start with a push.

    warm_epochs warm epochs, then joint epochs. Counting warm+joint epochs t = 1, 2, ...: after t = push_start and
    every push_every further ones, a push block follows: a push at the start of the next epoch and last_layer_epochs
    last-layer-only epochs (the public code: warm 5, first push at 10, every 10, 20 last-layer passes). With
    final_push the run always ends in a complete push block, so the model left at trainer.max_epochs has projected
    prototypes and a tuned last layer, whatever max_epochs is."""

    warm_epochs: int = 5
    push_start: int = 10
    push_every: int = 10
    last_layer_epochs: int = 20
    final_push: bool = True
    push: bool = True

    def __post_init__(self):
        self._warned_short = False
        for name in ("warm_epochs", "push_start", "last_layer_epochs"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"model.schedule.{name}={getattr(self, name)}: must be >= 0")
        if int(self.push_every) < 1:
            raise ConfigError(f"model.schedule.push_every={self.push_every}: must be >= 1")
        if self.push and int(self.last_layer_epochs) < 1:
            raise ConfigError("model.schedule.last_layer_epochs=0: every push is followed by at least one "
                              "last-layer epoch (the push runs at its start); set it >= 1 or model.schedule.push=false")

    def _plain(self, n: int) -> tuple[list[str], set[int]]:
        phases, pushes, t = [], set(), 0
        while len(phases) < n:
            phases.append("warm" if t < self.warm_epochs else "joint")
            t += 1
            if self.push and t >= self.push_start and (t - self.push_start) % self.push_every == 0:
                pushes.add(len(phases))
                phases.extend(["last_layer"] * self.last_layer_epochs)
        return phases[:n], {e for e in pushes if e < n}

    def plan(self, max_epochs: int | None, upto: int | None = None) -> tuple[list[str], set[int]]:
        """(phase of each epoch, epochs starting with a push) for a run of max_epochs (None/-1: open-ended, then the
        plan covers `upto` epochs)."""
        if max_epochs is None or max_epochs < 0:
            return self._plain(int(upto or 0))
        if not (self.push and self.final_push):
            return self._plain(max_epochs)
        block = self.last_layer_epochs
        if max_epochs < block + 1:
            # a short run (smoke tests, experiment=quick): shrink the final block so that training comes first
            block = min(max_epochs - 1, max(1, max_epochs // 3))
            if block < 1:
                warnings.warn(f"trainer.max_epochs={max_epochs}: too short for a push; the prototypes stay "
                              f"unprojected (needs >= 2 epochs)", stacklevel=2)
                return self._plain(max_epochs)
            if not self._warned_short:
                self._warned_short = True
                warnings.warn(f"trainer.max_epochs={max_epochs} is shorter than model.schedule.last_layer_epochs="
                              f"{self.last_layer_epochs} + 1; the final push block has {block} last-layer epoch(s)",
                              stacklevel=2)
        phases, pushes = self._plain(max_epochs - block)
        if phases[-1] == "last_layer":  # the cut fell inside a push block: extend that block instead of re-pushing
            phases += ["last_layer"] * block
        else:
            pushes.add(len(phases))
            phases += ["last_layer"] * block
        return phases, pushes

    def phase(self, epoch: int, max_epochs: int | None) -> tuple[str, bool]:
        phases, pushes = self.plan(max_epochs, upto=epoch + 1)
        if epoch >= len(phases):  # beyond the plan (max_epochs raised on resume): keep training jointly
            return "joint", False
        return phases[epoch], epoch in pushes


# ----- the model -----------------------------------------------------------------------------------------------------
class ProtoPNet(ClassifierModule):
    """`model=protopnet`. See the module docstring and docs/protopnet.md."""

    # UnitHead: the decision is a sum over prototypes, whose units are the channels of the similarity maps
    unit_layer = "prototypes"
    # the last layer reads each similarity map through its maximum (the prototype's best-matching patch): feature
    # visualisation measures a prototype's activation that way, not as the spatial mean of its map
    layer_pooling = {"prototypes": "max"}

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 64, backbone: str = "small",
                 pretrained=None, widths=None, prototypes_per_class: int = 10, prototype_dim: int = 128,
                 similarity: str = "log", coefs: Mapping[str, float] | None = None,
                 schedule: Mapping[str, Any] | None = None, phase_lrs: Mapping[str, Mapping[str, float]] | None = None,
                 weight_decay: Mapping[str, float] | None = None, optimizer: Callable | None = None,
                 joint_scheduler: Callable | None = None, freeze_batchnorm: bool = False, push_batch_size: int = 75,
                 prune: Mapping[str, Any] | None = None, last_layer_fit: Mapping[str, Any] | None = None,
                 **kwargs):
        super().__init__(num_classes=num_classes, channels=channels, image_size=image_size, optimizer=optimizer,
                         scheduler=joint_scheduler, **kwargs)
        self.save_hyperparameters(logger=False)
        # one optimiser per phase, stepped by hand (Lightning's automatic optimisation drives a single optimiser)
        self.automatic_optimization = False
        if int(prototypes_per_class) < 1:
            raise ConfigError(f"model.prototypes_per_class={prototypes_per_class}: every class needs at least one "
                              f"prototype (the paper uses 10)")
        if int(prototype_dim) < 1:
            raise ConfigError(f"model.prototype_dim={prototype_dim}: must be >= 1 (the paper uses 128)")
        if similarity not in SIMILARITIES:
            raise ConfigError(f"model.similarity={similarity!r}: choose one of {', '.join(SIMILARITIES)}")
        # conf/model/protopnet.yaml's values: the paper's (sep 0.8 is a measured option on shapes, docs/protopnet.md)
        self.coefs = {"crs_ent": 1.0, "clst": 0.8, "sep": 0.08, "l1": 1e-4, **dict(coefs or {})}
        unknown = set(self.coefs) - {"crs_ent", "clst", "sep", "l1"}
        if unknown:
            raise ConfigError(f"model.coefs has unknown keys {sorted(unknown)}; valid: crs_ent, clst, sep, l1")
        self.schedule = ProtoPNetSchedule(**dict(schedule or {}))
        self.phase_lrs = {p: dict(g) for p, g in (phase_lrs or DEFAULT_PHASE_LRS).items()}
        self.weight_decay = {**DEFAULT_WEIGHT_DECAY, **dict(weight_decay or {})}
        for phase, groups in self.phase_lrs.items():
            if phase not in PHASES:
                raise ConfigError(f"model.phase_lrs.{phase}: unknown phase; phases are {', '.join(PHASES)}")
            bad = set(groups) - set(GROUPS)
            if bad:
                raise ConfigError(f"model.phase_lrs.{phase} names unknown groups {sorted(bad)}; "
                                  f"groups are {', '.join(GROUPS)}")
        missing = [p for p in PHASES if not self.phase_lrs.get(p)]
        if missing:
            raise ConfigError(f"model.phase_lrs needs the groups and learning rates of every phase; missing "
                              f"{', '.join(missing)}")
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self.push_batch_size = int(push_batch_size)
        self.prune_cfg = {"enabled": False, "k": 6, "min_own_class": 3, **dict(prune or {})}
        self.last_layer_fit = LastLayerSettings(**dict(last_layer_fit or {}))

        self.backbone = build_backbone(backbone, channels, image_size, pretrained=pretrained, widths=widths,
                                       min_feature_size=MIN_FEATURE_SIZE)
        self.add_on = AddOnLayers(self.backbone.out_channels, int(prototype_dim))
        # the backbone's last conv, not add_on: add_on ends in a sigmoid, so its gradients vanish where it saturates
        # (Grad-CAM there scored pointing game 0.36 on shapes, 0.94 on the cnn's last conv) and featviz can gain
        # little over a unit that is already near 1
        self.default_probe_layer = next(reversed(self.backbone.probe_layers))
        self.num_prototypes = int(prototypes_per_class) * self.num_classes
        self.prototypes_per_class = int(prototypes_per_class)
        # init uniform in [0, 1), like the sigmoid-bounded patch features they are compared with
        self.prototype_vectors = nn.Parameter(torch.rand(self.num_prototypes, int(prototype_dim)))
        # prototype j belongs to class j // prototypes_per_class (one-hot identity [m, K])
        owner = torch.arange(self.num_prototypes) // self.prototypes_per_class
        self.register_buffer("prototype_class_identity", F.one_hot(owner, self.num_classes).float())
        # pruned prototypes stay in the tensors (checkpoints keep their shapes) but are masked out everywhere
        self.register_buffer("prototype_active", torch.ones(self.num_prototypes, dtype=torch.bool))
        self.prototype_maps = SimilarityMaps(similarity)
        self.last_layer = nn.Linear(self.num_prototypes, self.num_classes, bias=False)
        self.set_last_layer_incorrect_connection(-0.5)

        self.phase: str | None = None
        self.phase_history: list[dict[str, Any]] = []
        self.push_history: list[dict[str, Any]] = []
        self.last_push = None  # models.protopnet_push.PushResult of the latest push

    # ----- network --------------------------------------------------------------------------------------------
    @property
    def prototype_classes(self) -> torch.Tensor:
        return self.prototype_class_identity.argmax(dim=1)

    def set_last_layer_incorrect_connection(self, incorrect: float) -> None:
        """+1 to the own class, `incorrect` (-0.5 in the paper) to every other class."""
        own = self.prototype_class_identity.t()
        with torch.no_grad():
            self.last_layer.weight.copy_(own + incorrect * (1 - own))

    def prototype_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features z = add_on(backbone(x)), [B, D, H, W] in [0, 1]."""
        return self.add_on(self.backbone(x))

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        return squared_distances(z, self.prototype_vectors)

    @property
    def similarity(self) -> str:
        """"log" or "linear": the kind of the prototype_maps module (one place holds it)."""
        return self.prototype_maps.kind

    def outputs_from_distances(self, d: torch.Tensor) -> PrototypeOutputs:
        min_d = d.flatten(2).min(dim=2).values  # min-pooling over positions
        # max-pooled similarity maps = the similarity of the min-pooled distance (a decreasing function of it)
        sim = self.prototype_maps(d).flatten(2).amax(dim=2) * self.prototype_active
        return PrototypeOutputs(self.last_layer(sim), min_d, sim)

    def prototype_outputs(self, x: torch.Tensor) -> PrototypeOutputs:
        return self.outputs_from_distances(self.distances(self.prototype_features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototype_outputs(x).logits

    def similarity_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch similarity of every prototype, [B, m, H, W] (what "this looks like that" shows)."""
        return self.prototype_maps(self.distances(self.prototype_features(x)))

    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict(list(self.backbone.probe_layers.items()) + [("add_on", self.add_on),
                                                                      ("prototypes", self.prototype_maps)])

    def unit_contributions(self, x):
        # the decision is a sum over prototypes: logit_c = sum_j sim_j * w_cj
        return self.prototype_outputs(x).similarities, self.last_layer.weight

    # ----- loss (Eq. 2-4 of the paper) -------------------------------------------------------------------------
    def model_step(self, batch, stage: str):
        x, y = batch[0], batch[1]
        outputs = self.prototype_outputs(x)
        loss, terms = self.compute_loss(outputs, y, stage)
        return loss, terms, outputs.logits, y

    def compute_loss(self, outputs: PrototypeOutputs, y: torch.Tensor, stage: str):
        own = self.prototype_class_identity[:, y].t().bool() & self.prototype_active  # [B, m]
        other = ~self.prototype_class_identity[:, y].t().bool() & self.prototype_active
        min_d = outputs.min_distances
        ce = F.cross_entropy(outputs.logits, y)
        # an image whose class has every prototype pruned has no cluster term (inf -> 0), not an infinite loss
        cluster = masked_min(min_d, own).nan_to_num(posinf=0.0).mean()
        separation = masked_min(min_d, other).nan_to_num(posinf=0.0).mean()
        avg_separation = ((min_d * other).sum(dim=1) / other.sum(dim=1).clamp_min(1)).mean()
        l1 = (self.last_layer.weight * (1 - self.prototype_class_identity.t())).abs().sum()
        c = self.coefs
        loss = c["crs_ent"] * ce + c["clst"] * cluster - c["sep"] * separation + c["l1"] * l1
        return loss, {"cross_entropy": ce.detach(), "cluster": cluster.detach(), "separation": separation.detach(),
                      "avg_separation": avg_separation.detach(), "l1": l1.detach()}

    # ----- phases -----------------------------------------------------------------------------------------------
    def group_parameters(self, group: str) -> list[nn.Parameter]:
        return {"backbone": lambda: list(self.backbone.parameters()),
                "add_on": lambda: list(self.add_on.parameters()),
                "prototypes": lambda: [self.prototype_vectors],
                "last_layer": lambda: list(self.last_layer.parameters())}[group]()

    def group_modules(self, group: str) -> list[nn.Module]:
        return {"backbone": [self.backbone], "add_on": [self.add_on], "prototypes": [],
                "last_layer": [self.last_layer]}[group]

    def configure_optimizers(self):
        """One optimiser per phase over exactly that phase's groups (Adam in the public code); the joint phase's
        step schedule is stepped by hand at the end of every joint epoch."""
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params))
        optimizers = []
        for phase in PHASES:
            groups = [{"params": self.group_parameters(g), "lr": float(lr), "weight_decay": float(self.weight_decay[g]),
                       "name": f"{phase}/{g}"} for g, lr in self.phase_lrs[phase].items()]
            optimizers.append(factory(params=groups))
        schedulers = []
        if self.scheduler_factory is not None:
            schedulers.append({"scheduler": self.scheduler_factory(optimizer=optimizers[PHASES.index("joint")]),
                               "interval": "epoch"})
        return optimizers, schedulers

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and int(data_classes) != self.num_classes:
            raise ConfigError(f"model.num_classes={self.num_classes} disagrees with the data ({type(dm).__name__} "
                              f"has {data_classes} classes); drop the model.num_classes override")
        # frozen groups get no gradient in warm and last-layer epochs; DDP must be told, or it waits for them
        allow_unused_parameters(self._trainer, stage)

    def apply_phase(self, phase: str) -> None:
        """requires_grad on exactly the phase's groups (so frozen parts cost no backward pass); with
        freeze_batchnorm, frozen groups also stop updating their BatchNorm statistics."""
        self.phase = phase
        trainable = set(self.phase_lrs[phase])
        for g in GROUPS:
            for p in self.group_parameters(g):
                p.requires_grad_(g in trainable)
        if self.training:
            self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        # convex last layer: its epochs only measure, and BatchNorm statistics updated there would change the
        # similarities the last layer was solved on (so that it is no longer their optimum)
        frozen_stats = self.freeze_batchnorm or (self.phase == "last_layer" and self.convex_last_layer)
        if mode and frozen_stats and self.phase is not None:
            for g in GROUPS:
                if g not in self.phase_lrs[self.phase]:
                    for module in self.group_modules(g):
                        for m in module.modules():
                            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                                m.eval()
        return self

    @property
    def max_epochs(self) -> int | None:
        return self.trainer.max_epochs if self._trainer is not None else None

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        phase, push = self.schedule.phase(epoch, self.max_epochs)
        if self.phase_history and self.phase_history[-1]["epoch"] == epoch:
            self.phase_history.pop()  # this epoch is being re-run (mid-epoch checkpoint)
        self.phase_history.append({"epoch": epoch, "phase": phase})
        if push and not any(h["epoch"] == epoch for h in self.push_history):
            self.push()
        self.apply_phase(phase)

    @property
    def convex_last_layer(self) -> bool:
        return self.last_layer_fit.solver == "convex"

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()[PHASES.index(self.phase)]
        if self.phase == "last_layer" and self.convex_last_layer:
            # the push already solved the last layer to its optimum: these epochs only measure (a gradient step
            # would move it off the optimum)
            with torch.no_grad():
                return super().training_step(batch, batch_idx)
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("train/phase", float(PHASES.index(self.phase)), on_step=False, on_epoch=True)
        if self.phase == "joint":
            schedulers = self.lr_schedulers() if self.scheduler_factory is not None else None
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
                scheduler.step()

    # ----- checkpoint selection ---------------------------------------------------------------------------------
    @property
    def prototypes_projected(self) -> bool:
        """True while the prototypes are the patches of the latest push (only the last layer trains after it)."""
        return self.phase == "last_layer" and bool(self.push_history)

    def on_validation_epoch_end(self) -> None:
        # val/acc in epochs whose prototypes are projected, 0 before: what the best checkpoint is chosen on
        # (conf/model/protopnet.yaml sets callbacks.model_checkpoint.monitor), so the tested model has pushed prototypes
        if self.schedule.push and not self.trainer.sanity_checking:
            # compute() already reduces over ranks; identical everywhere
            value = self.val_acc.compute() if self.prototypes_projected else torch.zeros((), device=self.device)
            self.log("val/acc_pushed", value, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_end(self) -> None:
        for p in self.parameters():  # leave a normal module behind (callbacks, tests, notebooks)
            p.requires_grad_(True)

    # ----- push ------------------------------------------------------------------------------------------------
    def push(self, loader=None):
        """Project every prototype onto its nearest training patch of its own class (exact global argmin over the
        datamodule's push set, sharded across ranks); returns the PushResult and records it in push_history."""
        if loader is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "push_dataloader"):
                raise RuntimeError("ProtoPNet's push needs the datamodule's push_dataloader(): train with "
                                   "trainer.fit(model, datamodule=...)")
            loader = shard_loader(dm.push_dataloader(batch_size=self.push_batch_size))
        was_training = self.training
        self.eval()  # push with BatchNorm running statistics, as the public code does
        try:
            result = push_prototypes(self, loader)
            with torch.no_grad():
                self.prototype_vectors.copy_(result.prototypes.to(self.prototype_vectors))
            pruned = self.prune(loader) if self.prune_cfg.get("enabled") else []
            fit = self.fit_last_layer(loader) if self.convex_last_layer else None
        finally:
            self.train(was_training)
        self.last_push = result
        epoch = self.current_epoch if self._trainer is not None else -1
        entry = {"epoch": epoch, "global_step": int(self.global_step) if self._trainer is not None else 0,
                 **result.summary(), "pruned": pruned}
        if fit is not None:
            entry["last_layer_fit"] = fit.summary()
        self.push_history.append(entry)
        if D.rank() == 0:
            log.info("ProtoPNet push at epoch %d: %d/%d prototypes projected, mean distance %.4f, %d unique source "
                     "images%s", epoch, entry["pushed"], self.num_prototypes, entry["mean_distance"],
                     entry["unique_sources"], f", pruned {len(pruned)}" if pruned else "")
            if fit is not None:
                log.info("ProtoPNet last layer (convex, %d images): objective %.5f -> %.5f in %d iterations, %.2f s, "
                         "KKT residual %.2e (%s)", fit.images, fit.initial_objective, fit.objective, fit.iterations,
                         fit.seconds, fit.kkt_residual, "optimal" if fit.converged else "max_iter reached")
        return result

    @torch.no_grad()
    def fit_last_layer(self, loader):
        """The paper's last-layer phase as one convex solve (models/protopnet_last_layer.py): the similarities of
        every push image, computed once with the frozen network, then CE + l1 |off-class W| + l2/2 ||W||^2 solved to
        its optimum; the last layer takes the solution. Returns the LastLayerFit (its convergence)."""
        cfg = self.last_layer_fit
        sims, labels = training_similarities(self, loader)
        fit = fit_last_layer(sims, labels, off_class_mask(self.prototype_class_identity), float(cfg.l1),
                             float(cfg.l2), weight0=self.last_layer.weight, max_iter=int(cfg.max_iter),
                             tol=float(cfg.tol))
        weight = same_on_every_rank(fit.weight.to(self.last_layer.weight))
        self.last_layer.weight.copy_(weight * self.prototype_active)  # pruned prototypes keep a zero column
        return fit

    @torch.no_grad()
    def prune(self, loader) -> list[int]:
        """Pruning of the public code: prototype j is pruned when fewer than min_own_class of its k nearest training
        patches (one per image) come from its class. Pruned prototypes are masked, not deleted."""
        k, need = int(self.prune_cfg["k"]), int(self.prune_cfg["min_own_class"])
        nearest = k_nearest_patches(self, loader, k=k, one_per_image=True)
        own = (nearest.labels == self.prototype_classes.to(nearest.labels).unsqueeze(1)).sum(dim=1)
        prune = (own < need) & self.prototype_active.cpu()
        idx = prune.nonzero().flatten().tolist()
        if idx:
            self.prototype_active[prune.to(self.prototype_active.device)] = False
            self.last_layer.weight[:, prune.to(self.last_layer.weight.device)] = 0
        return idx

    # ----- checkpoint ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["protopnet"] = {"phase": self.phase, "phase_history": list(self.phase_history),
                                   "push_history": list(self.push_history),
                                   "last_push": None if self.last_push is None else self.last_push.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("protopnet") or {}
        self.phase = state.get("phase")
        self.phase_history = list(state.get("phase_history", []))
        self.push_history = list(state.get("push_history", []))
        self.last_push = PushResult.from_state_dict(state["last_push"]) if state.get("last_push") else None


# the same values as conf/model/protopnet.yaml (tests/test_defaults.py keeps them equal); see the yaml for why they
# differ from the public code's (joint backbone 1e-4 for a pretrained backbone, last layer 1e-4 over 20 epochs)
DEFAULT_PHASE_LRS = {"warm": {"add_on": 3e-3, "prototypes": 3e-3},
                     "joint": {"backbone": 2e-3, "add_on": 3e-3, "prototypes": 3e-3},
                     "last_layer": {"last_layer": 1e-2}}
DEFAULT_WEIGHT_DECAY = {"backbone": 1e-3, "add_on": 1e-3, "prototypes": 0.0, "last_layer": 0.0}
