"""Where a trained shapes ProtoPNet puts its prototypes and its evidence (docs/protopnet.md, "Where the prototypes
sit"): the push sources against the ground-truth object masks, the model's accuracy with the object or the
background removed, where the top prototype of the true class peaks on validation images, Grad-CAM's pointing game
per probe layer, and featviz objectives on the prototypes measured on the max-pooled similarity.

    python benchmarks/protopnet_placement.py --run <ProtoPNet run folder> [--data-dir data] [--images 256]
        [--featviz-steps 32 128]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import common  # noqa: F401  (puts the repository root on sys.path)


def placement(model, probe, masks) -> dict[str, float]:
    """The push source cell of every prototype against its source image's class-object mask."""
    from algorithms.prototypes import class_object_hits
    res = model.last_push
    sources = {int(i): probe[int(i)] for i in res.image_index[res.pushed].unique()}
    obj = {i: masks(item) for i, item in sources.items()}
    h, w = res.activation.shape[-2:]
    cy, cx = res.image_size / h, res.image_size / w
    on, overlap, dist = [], [], []
    for j in res.pushed.nonzero().flatten().tolist():  # m small masks, once: not a hot path
        o = obj[int(res.image_index[j])]
        ph, pw = res.position[j].tolist()
        y, x = int((ph + 0.5) * cy), int((pw + 0.5) * cx)
        on.append(bool(o[y, x]))
        overlap.append(bool(o[int(ph * cy):int((ph + 1) * cy), int(pw * cx):int((pw + 1) * cx)].any()))
        ys, xs = o.nonzero(as_tuple=True)
        dist.append(float(((ys - y) ** 2 + (xs - x) ** 2).float().sqrt().min()) if len(ys) else float("inf"))
    hits = class_object_hits(res, {i: torch.as_tensor(it["seg"]) for i, it in sources.items()},
                             probe.class_concepts, tuple(probe.seg_size))
    near = res.distance[res.pushed] < 1.0
    n = len(on)
    return {"prototypes": n, "cell_centre_on_object": sum(on) / n, "cell_overlaps_object": sum(overlap) / n,
            "within_one_cell": sum(d <= cy for d in dist) / n, "median_px_to_object": statistics.median(dist),
            "class_object_hit_rate": float(hits.nanmean()),
            "prepush_distance_below_1": float(near.float().mean()),
            "prepush_distance_median": float(res.distance[res.pushed].median())}


@torch.no_grad()
def evidence(model, x, y, mask) -> dict[str, float]:
    """Accuracy with the object or the background replaced by the mean colour (0 after normalisation), and where
    the true class's top-contributing prototype peaks."""
    acc = lambda z: float((model(z).argmax(1) == y).float().mean())  # noqa: E731
    keep = mask[:, None].to(x)
    maps = model.similarity_maps(x)                                  # [B, m, h, w]
    h, w = maps.shape[-2:]
    top = (maps.flatten(2).amax(2) * model.last_layer.weight[y]).argmax(1)
    peak = maps[torch.arange(len(x)), top].flatten(1).argmax(1)
    ph, pw = peak // w, peak % w
    sy, sx = x.shape[-2] / h, x.shape[-1] / w
    centre = mask[torch.arange(len(x)), ((ph + 0.5) * sy).long(), ((pw + 0.5) * sx).long()]
    cells = torch.nn.functional.adaptive_max_pool2d(mask[:, None].float(), (h, w))[:, 0]  # any object pixel
    return {"acc": acc(x), "acc_object_only": acc(x * keep), "acc_object_removed": acc(x * (1 - keep)),
            "top_prototype_peak_on_object": float(centre.float().mean()),
            "top_prototype_peak_cell_overlaps_object": float(cells[torch.arange(len(x)), ph, pw].mean())}


def featviz_objectives(model, dm, ds, steps: int, units) -> dict[str, float]:
    """Median gain of the max-pooled similarity (what the last layer reads) of `units` from the same noise, for the
    spatial-mean objective (what featviz optimises) and for the max itself."""
    from algorithms.featviz import FourierImage, colour_correlation_sqrt, standard_transforms, visualize
    from algorithms.featviz.objectives import unit_objective
    csqrt = colour_correlation_sqrt(torch.stack([ds[i]["raw"] for i in range(min(64, len(ds)))]))
    jobs, idx = [("unit", u) for u in units], torch.arange(len(units))

    def best_similarity(images01):
        with torch.no_grad():
            return model.similarity_maps(dm.normalize(images01))[idx, units].flatten(1).amax(1)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.as_tensor([int(ds[i]["label"]) for i in range(len(ds))])
    with torch.no_grad():
        data = model.similarity_maps(x)[:, units].flatten(2).amax(2)       # [N, U]
    own = y[:, None] == model.prototype_classes[units][None]
    out = {"data_own_class_mean": float(data[own].mean()), "data_mean": float(data.mean())}
    for pooling in ("mean", "max"):
        param = FourierImage(len(units), 3, dm.image_size, colour_sqrt=csqrt,
                             generator=torch.Generator().manual_seed(0))
        s0 = best_similarity(param())
        images, _ = visualize(model, unit_objective("prototypes", jobs, pooling), param,
                              standard_transforms(dm.image_size / 224), steps, 0.05, dm.normalize)
        s1 = best_similarity(images)
        out["noise_start_mean"] = float(s0.mean())
        out[f"objective_{pooling}_gain_median"] = float((s1 / s0).median())
        out[f"objective_{pooling}_final_mean"] = float(s1.mean())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--layers", nargs="+", default=None, help="Grad-CAM layers (default: every backbone stage, add_on)")
    p.add_argument("--featviz-steps", type=int, nargs="*", default=[32, 128])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from algorithms.attribution.evaluate import evaluate
    from algorithms.attribution.masks import ProbeMasks, collate_probe, probe_items
    from datamodules.shapes import ShapesDataModule
    from models.protopnet import ProtoPNet
    model = ProtoPNet.load_from_checkpoint(f"{a.run}/checkpoints/last.ckpt", map_location="cpu",
                                           weights_only=False).eval()
    dm = ShapesDataModule(data_dir=a.data_dir)
    dm.prepare_data()
    dm.setup("fit")
    train_probe = dm.probe_dataset("train")
    for k, v in placement(model, train_probe, ProbeMasks(train_probe)).items():
        print(f"push sources: {k} {v:.3f}")
    ds, masks = probe_items(dm, "val", a.images)
    batches = [collate_probe([ds[i] for i in range(s, min(s + 64, len(ds)))], masks) for s in range(0, len(ds), 64)]
    x, y, mask = (torch.cat([b[k] for b in batches]) for k in ("image", "label", "mask"))
    for k, v in evidence(model, x, y, mask).items():
        print(f"val images: {k} {v:.3f}")
    layers = a.layers or [*model.backbone.probe_layers, "add_on"]
    for layer in layers:
        m = evaluate(model, batches, ["gradcam"], layer).metrics()["gradcam"]
        print(f"gradcam {layer}: pointing_game {m['pointing_game']:.3f} strict {m['pointing_game_strict']:.3f} "
              f"energy {m['energy']:.3f}")
    for name, m in evaluate(model, batches, ["prototype_maps", "saliency"]).metrics().items():
        print(f"{name}: pointing_game {m['pointing_game']:.3f} energy {m['energy']:.3f}")
    units = list(range(0, model.num_prototypes, model.prototypes_per_class))[:8]  # one prototype per class
    for steps in a.featviz_steps:
        for k, v in featviz_objectives(model, dm, ds, steps, units).items():
            print(f"featviz {steps} steps: {k} {v:.3f}")


if __name__ == "__main__":
    main()
