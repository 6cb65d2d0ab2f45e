"""The per-epoch feature-visualization callback: units (and classes) of the probe layer visualised with
algorithms/featviz (jobs split over ranks, images gathered), the first-layer filter grid and the top activating
probe patches per unit (probe images sharded, candidates gathered); rank 0 writes the grids and featviz.json
(FeatvizResult). The method is plain code in algorithms/featviz/."""
from __future__ import annotations

import torch

from algorithms.attribution.masks import SPLITS, probe_items
from algorithms.featviz import (PARAMETRISATIONS, colour_correlation_sqrt, featviz_jobs, featviz_result,
                                first_layer_filters, keep_top, no_top_activations, patch_crops, save_grid,
                                save_patch_grid, save_unit_sheet, standard_transforms, top_activations,
                                top_activations_of_maps, unit_label, visualize_units)
from callbacks.base import InterpretationCallback, check_fraction, check_int
from core import distributed as D
from core.errors import ConfigError
from core.protocol import PrototypeModel
from core.probe import capture, layer_pooling, resolve_one


class FeatureVisualizationCallback(InterpretationCallback):
    """Every `every_n_epochs` (and after the last epoch): feature visualizations of the first `num_units` channels of
    `layer` (default: the model's default probe layer, else its last probe layer) and of the class scores when
    `classes` is true, the jobs split over ranks, `steps` Adam steps each; the first-layer filter grid; the
    top-`k_patches` activating probe patches per unit (probe images sharded, the candidates gathered). Rank 0
    writes units.png / classes.png / filters.png / patches.png (plain grids) and unit_sheet.png / class_sheet.png (the
    same images labelled: unit, its dissection concept and IoU when this epoch dissected the layer, its activation
    against the data, the top patches' activations; the class names and scores) and featviz.json.

    Warm start: a run continues from the previous run's parametrisation for `warm_steps` steps (null: every run
    starts from noise for `steps`); every `restart_every_n_epochs`-th epoch (null: never) starts from noise again.
    The gain stays measured against the noise image. Units are optimised before the layer's last ReLU (`pre_relu`)
    and measured after it, read from their maps as the model reads them (core.probe.layer_pooling: the spatial
    mean, or the maximum for ProtoPNet's prototypes). Metrics:
    interp/featviz/activation_gain_{min,median} (final / initial unit activation on the untransformed image,
    the initial one floored at GAIN_FLOOR), interp/featviz/activation_final_mean, and
    interp/featviz/activation_vs_data_min (final / the unit's mean activation over the probe images).
    Defaults: conf/callbacks/featviz.yaml."""

    name = "featviz"

    def __init__(self, layer: str | None = None, num_units: int = 8, classes: bool = True, steps: int = 32,
                 lr: float = 0.05, parametrisation: str = "fourier", decorrelate: bool = True,
                 transforms: bool = True, pre_relu: bool = True, k_patches: int = 6,
                 patch_size: int | None = None, max_images: int = 256,
                 split: str = "val", seed: int = 0, warm_steps: int | None = 8,
                 restart_every_n_epochs: int | None = None, every_n_epochs: int = 1, render_every_n_epochs: int = 5,
                 **kwargs):
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        if parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"{self.option('parametrisation')}={parametrisation!r}: choose from "
                              f"{', '.join(PARAMETRISATIONS)}")
        if split not in SPLITS:
            raise ConfigError(f"{self.option('split')}={split!r}: use one of {', '.join(SPLITS)}")
        self.num_units = check_int(num_units, self.option("num_units"), 1)
        self.steps = check_int(steps, self.option("steps"), 1)
        self.k_patches = check_int(k_patches, self.option("k_patches"), 1)
        self.max_images = check_int(max_images, self.option("max_images"), 1)
        self.patch_size = check_int(patch_size, self.option("patch_size"), 1, allow_none=True)
        self.lr = check_fraction(lr, self.option("lr"), 0.0, float("inf"))
        self.layer, self.classes = layer, bool(classes)
        self.parametrisation, self.decorrelate, self.transforms = parametrisation, bool(decorrelate), bool(transforms)
        self.pre_relu = bool(pre_relu)
        self.split, self.seed = split, int(seed)
        self.warm_steps = check_int(warm_steps, self.option("warm_steps"), 1, allow_none=True)
        self.restart_every_n_epochs = check_int(restart_every_n_epochs, self.option("restart_every_n_epochs"), 1,
                                                allow_none=True)
        self.render_every_n_epochs = check_int(render_every_n_epochs, self.option("render_every_n_epochs"), 1)
        # the last run's parametrisation (what the next run continues from) and what it was for
        self._warm: dict | None = None

    # ----- before training ------------------------------------------------------------------------------------
    def validate(self, trainer, module, datamodule) -> None:
        layer = resolve_one(module, self.layer, self.option("layer")).name  # None: default_layer; unknown: listed
        if datamodule is not None:
            ds, _ = probe_items(datamodule, self.split, 1)
            if len(ds) == 0:
                raise ConfigError(f"{self.option('split')}={self.split!r}: the {self.split} split has no images")
        dissection = self._dissection(trainer)
        if dissection is not None:
            # the probe images' maps of the layer come from dissection's probe pass of each epoch
            dissection.share_probe_pass([layer])

    def _dissection(self, trainer):
        """The run's dissection callback when its probe set starts with the images searched for top activations
        (the same datamodule probe set and split): their maps then come from its probe pass. Else None."""
        dissection = self.provider(trainer, "dissection", required=False)
        dm = getattr(trainer, "datamodule", None)
        if dissection is None or dm is None or not hasattr(dm, "probe_dataset"):
            return None
        return dissection if dissection.shares_probe(trainer, self.split, self.max_images) else None

    # ----- every few epochs -------------------------------------------------------------------------------------
    def run(self, trainer, module, epoch):
        device = module.device
        dm = self.datamodule(trainer)
        layer = resolve_one(module, self.layer, self.option("layer")).name
        pooling = layer_pooling(module, layer)
        normalize = getattr(dm, "normalize", None) or (lambda img: img)
        ds, _ = probe_items(dm, self.split, self.max_images)

        # ---- units (and classes) as one batch per rank -------------------------------------------------------
        x0 = ds[0]["image"][None].to(device)
        with torch.no_grad():
            first = capture(module, layer, x0, scores=True)
        maps = first.acts[layer]
        jobs = featviz_jobs(min(self.num_units, maps.shape[1]), first.scores.shape[1] if self.classes else 0)
        mine = [jobs[i] for i in D.shard_indices(len(jobs))]
        channels, size = x0.shape[1], x0.shape[-1]
        values = torch.zeros(len(mine), 2, device=device)  # initial, final activation (or class score)
        images = torch.zeros(len(mine), channels, size, size, device=device)
        steps = self.steps
        if mine:
            colour_sqrt = self._colour_sqrt(ds) if channels == 3 and self.decorrelate else None
            gen = torch.Generator().manual_seed(self.seed + 7919 * D.rank())
            make = lambda: PARAMETRISATIONS[self.parametrisation](  # noqa: E731
                len(mine), channels, size, decorrelate=self.decorrelate, colour_sqrt=colour_sqrt, device=device,
                generator=gen)
            noise = make()
            param, steps = self._warm_start(make, noise, (layer, tuple(mine), channels, size), epoch)
            values, images = visualize_units(
                module, layer, mine, param, steps=steps, lr=self.lr,
                transforms=standard_transforms(size / 224) if self.transforms else None, normalize=normalize,
                pre_relu=self.pre_relu, seed=self.seed + D.rank(),
                progress=lambda it: self.progress(it, "optimise", total=steps), initial=noise, pooling=pooling)
            self._warm = {"key": (layer, tuple(mine), channels, size), "state": {
                k: v.detach().clone() for k, v in param.state_dict().items()}}
        values, images = D.all_gather_cat(values), D.all_gather_cat(images)

        # ---- maximally activating patches: probe images sharded, candidates gathered --------------------------
        units = [v for kind, v in jobs if kind == "unit"]
        k = min(self.k_patches, len(ds))
        dissection = self._dissection(trainer)
        shared = dissection.first_maps(trainer, module, epoch, layer, len(ds)) if dissection is not None else None
        # every rank takes the same branch: the pass is kept or not on all ranks together (ProbePass.build)
        if shared is not None:
            top = (top_activations_of_maps(shared, units, k) if shared
                   else no_top_activations(len(units), maps.shape[-2:], device))
        else:
            shard = self.shard(ds)
            offset = shard.indices[0] if len(shard.indices) else 0
            batches = (torch.stack([shard[j]["image"] for j in range(s, min(s + self.batch_size, len(shard)))])
                       .to(device) for s in range(0, len(shard), self.batch_size))
            top = (top_activations(module, layer, batches, units, k, index_offset=offset)
                   if len(shard) else no_top_activations(len(units), maps.shape[-2:], device))
        vals, idx, pos = keep_top(D.all_gather_cat(top.values), D.all_gather_cat(top.indices),
                                  D.all_gather_cat(top.positions), k)
        top = top._replace(values=vals, indices=idx, positions=pos)
        # the units' mean activation over the probe set, read as the model reads them
        data_mean = D.all_reduce_sum(top.max_sum if pooling == "max" else top.mean_sum) / max(1, len(ds))

        result = featviz_result(layer, jobs, values, data_mean, top, steps=steps,
                                parametrisation=self.parametrisation, class_names=getattr(dm, "class_names", None),
                                epoch=int(epoch), pooling=pooling)
        if self.is_rank_zero:
            self._render(trainer, module, dm, ds, jobs, images, top, result)
        return dict(result.metrics)

    def _warm_start(self, make, noise, key, epoch: int):
        """(parametrisation, steps): the previous run's parametrisation continued for `warm_steps` steps (its units'
        images move with the model, which changed by one epoch), or a start from noise for `steps` steps: the first
        run, warm_steps null, another layer or set of jobs, and every `restart_every_n_epochs`-th epoch."""
        restart = self.restart_every_n_epochs is not None and (epoch + 1) % self.restart_every_n_epochs == 0
        warm = self._warm
        if self.warm_steps is None or restart or warm is None or tuple(warm["key"]) != tuple(key):
            return noise, self.steps
        param = make()
        param.load_state_dict(warm["state"])  # copies onto the parametrisation's device
        return param, min(self.warm_steps, self.steps)   # never more than a start from noise

    def state_dict(self):
        return {**super().state_dict(), "warm": self._warm}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._warm = state_dict.get("warm")

    @staticmethod
    def _colour_sqrt(ds):
        raws = [ds[i].get("raw") for i in range(min(len(ds), 64))]
        if any(r is None for r in raws):
            return None
        return colour_correlation_sqrt(torch.stack(raws))

    def _render(self, trainer, module, dm, ds, jobs, images, top, result):
        """Rank 0 only, no collectives: featviz.json into the epoch folder, and the grids when they are due
        (render_every_n_epochs)."""
        out = self.epoch_dir(trainer, int(result.epoch))
        result.save(out / "featviz.json")
        if not self.render_due(trainer, self.render_every_n_epochs):
            return
        paths = []
        unit_rows = [i for i, j in enumerate(jobs) if j[0] == "unit"]
        class_rows = [i for i, j in enumerate(jobs) if j[0] == "class"]
        save_grid(images[unit_rows], out / "units.png", nrow=8, upscale=2)
        if class_rows:
            save_grid(images[class_rows], out / "classes.png", nrow=8, upscale=2)
            units = [u for u in result.units if u.kind == "class"]
            save_unit_sheet(images[class_rows], None, out / "class_sheet.png",
                            [f"class {u.index}\n{u.name or ''}\nscore {u.final:.2f}\n(start {u.initial:.2f})"
                             for u in units], title=f"featviz: class scores, epoch {result.epoch}",
                            headers=("optimised image", ""), columns=4)
            paths.append(out / "class_sheet.png")
        filters = first_layer_filters(module)
        save_grid(filters, out / "filters.png", nrow=16, upscale=max(1, 24 // filters.shape[-1]))
        paths.append(out / "filters.png")
        if top.indices.numel():
            raws = []
            for i in top.indices.T.flatten().tolist():  # unit-major: one row of k patches per unit
                item = ds[i]
                raw = item.get("raw")
                raws.append(raw if raw is not None else (dm.denormalize(item["image"][None])[0]
                                                         if hasattr(dm, "denormalize") else item["image"]))
            save_patch_grid(torch.stack(raws), top.positions.transpose(0, 1).reshape(-1, 2), top.map_size,
                            out / "patches.png", per_unit=top.indices.shape[0], patch=self.patch_size)
        self._unit_sheet(trainer, module, result, images[unit_rows], raws if top.indices.numel() else None, top,
                         out / "unit_sheet.png")
        paths.append(out / "unit_sheet.png")
        self.log_images(trainer, "grids", paths, [p.stem for p in paths])

    def _unit_sheet(self, trainer, module, result, vis, raws, top, path) -> None:
        """unit_sheet.png: per unit its label (channel, or prototype and its class; the dissection concept and IoU
        when the dissection callback dissected this layer this epoch; final activation against the data mean), its
        optimised image and its top probe patches with their activations (rank 0, no collectives)."""
        units = [u for u in result.units if u.kind == "unit"]
        concepts = self._concepts(trainer, result.layer, int(result.epoch))
        # the units of a PrototypeModel's unit layer are its prototypes (core/protocol.py): label them with their class
        classes = None
        if isinstance(module, PrototypeModel) and result.layer == getattr(module, "unit_layer", None):
            classes = module.prototype_classes.tolist()
        names = getattr(self.datamodule(trainer), "class_names", None)
        labels = [unit_label(u, result.pooling, concepts.get(u.index),
                             None if classes is None else (names[classes[u.index]] if names else classes[u.index]))
                  for u in units]
        patches, captions = None, None
        if raws is not None and result.top_patches is not None:
            k = top.indices.shape[0]
            cut = patch_crops(torch.stack(raws), top.positions.transpose(0, 1).reshape(-1, 2), top.map_size,
                              self.patch_size)
            patches = cut.reshape(len(units), k, *cut.shape[1:])
            tp = result.top_patches
            captions = [[f"#{i} {a:.2f}" for i, a in zip(idx, act)]
                        for idx, act in zip(tp.dataset_index, tp.activation)]
        save_unit_sheet(vis, patches, path, labels, captions,
                        title=f"featviz: {result.layer}, epoch {result.epoch} (activation: the unit map's "
                              f"{result.pooling}; under each patch: probe image #, the unit's peak there)")

    def _concepts(self, trainer, layer: str, epoch: int) -> dict[int, str]:
        """channel -> "concept (IoU x.xx)" from the dissection callback's own result of this epoch, when it dissected
        `layer`; nothing is computed here."""
        dissection = self.provider(trainer, "dissection", required=False)
        results = getattr(dissection, "results", None) or {}
        if dissection is None or getattr(dissection, "results_epoch", None) != epoch or layer not in results:
            return {}
        res = results[layer]
        return {int(r["unit"]) - 1: f"{r['label']} (IoU {r['score']:.2f}" +
                ("" if r["interpretable"] else f" < {res.iou_threshold:g}") + ")"
                for r in res.labels() if r["label"] != "-"}
