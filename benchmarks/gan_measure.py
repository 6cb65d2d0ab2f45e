"""The figures of the GAN issue's "Done when", measured on a trained GAN run (docs/gan.md shows the output):
domain Fréchet distance per epoch checkpoint, the segmenter's own mIoU, GAN dissection (best unit per shape and
colour), ablation/insertion of the top units of each shape vs random units, SeFa vs random directions.

    python benchmarks/gan_measure.py --run <gan run folder> --segmenter <segmenter ckpt> [--layer block1]
        [--figures docs/figures/gan]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository root on sys.path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--segmenter", required=True)
    p.add_argument("--layer", default="block1")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--units", type=int, default=20)
    p.add_argument("--fd-images", type=int, default=1000)
    p.add_argument("--every", type=int, default=1, help="FD of every n-th epoch checkpoint")
    p.add_argument("--intervention-samples", type=int, default=64)
    p.add_argument("--random-draws", type=int, default=5)
    p.add_argument("--traversal-samples", type=int, default=32)
    p.add_argument("--concepts", nargs="+", default=["circle", "square", "triangle", "cross"],
                   help="concepts whose top units are ablated / inserted")
    p.add_argument("--figures")
    p.add_argument("--data-dir", default="data")
    a = p.parse_args()
    from algorithms.gan.directions import directions_of, traverse
    from algorithms.gan.dissection import dissect_generator
    from algorithms.gan.interventions import intervene
    from algorithms.gan.render import render_intervention, render_top_units, render_traversal
    from datamodules.shapes import ShapesDataModule
    from models.gan import GAN
    from models.gan_metrics import frechet_distance
    torch.manual_seed(0)
    ckpts = sorted(Path(a.run, "checkpoints").glob("epoch*.ckpt"))
    out: dict = {"layer": a.layer}
    # domain FD per epoch: 1000 validation images vs 1000 samples, in the segmenter's feature space
    dm = ShapesDataModule(a.data_dir, normalize=False, augment=False)
    dm.setup("fit")
    val = dm.vis_dataset("val")
    real = torch.stack([val[i][0] for i in range(min(a.fd_images, len(val)))])
    fds, fr = [], None
    chosen = ckpts[::a.every] + ([ckpts[-1]] if (len(ckpts) - 1) % a.every else [])
    for ck in chosen:
        gan = GAN.load_from_checkpoint(str(ck), map_location="cpu", weights_only=False, segmenter=a.segmenter).eval()
        seg = gan.concept_segmenter
        with torch.no_grad():
            fr = torch.cat([seg.embedding(x) for x in real.split(200)]) if fr is None else fr
            z = torch.randn(len(real), gan.latent_dim, generator=torch.Generator().manual_seed(1234))
            ff = torch.cat([seg.embedding(gan.generate(zb)) for zb in z.split(200)])
        fds.append((ck.stem, frechet_distance(fr, ff)))
        print(f"{ck.stem}: domain FD {fds[-1][1]:.3f}", flush=True)
    out["fd"] = fds
    names = seg.concept_names
    d = dissect_generator(gan, a.layer, a.samples)
    iou = d.iou
    out["dissection"] = {names[c]: {"best_unit": int(iou[:, c].argmax()), "iou": float(iou[:, c].max()),
                                    "units_labelled": int((d.unit_concepts() == c).sum())}
                         for c in range(1, len(names))}
    out["dissection_summary"] = d.summary()
    print(json.dumps(out["dissection"], indent=1), flush=True)
    res = intervene(gan, d, [names.index(n) for n in a.concepts], a.units, num_samples=a.intervention_samples, random_draws=a.random_draws)
    out["intervention"] = res.payload()["concepts"]
    for r in res.concepts:
        print(f"{r.name}: share {r.base_share:.4f} ablated {r.ablated_share:.4f} drop {r.ablation_drop:.2f} "
              f"random drop {r.random_ablation_drop:.2f}; inserted-new {r.inserted_new_share:.3f} "
              f"(random {sum(r.random_inserted_new_share) / len(r.random_inserted_new_share):.3f}); ACE {r.ace:.4f} "
              f"random ACE {r.random_ace:.4f}", flush=True)
    dirs, eig = directions_of(gan, ["sefa", "random"], 5)
    tr = traverse(gan, dirs, num_samples=a.traversal_samples, eigenvalues=eig)
    out["directions"] = {fam: {"max_change": tr.change(fam).amax(dim=1).tolist(),
                               "top_concept": [names[int(i)] for i in tr.change(fam).argmax(dim=1)],
                               "concepts_changed": tr.concepts_changed(fam).tolist(),
                               "class_change": tr.class_change(fam).tolist()} for fam in dirs}
    print(json.dumps(out["directions"], indent=1), flush=True)
    if a.figures:
        fig = Path(a.figures)
        render_top_units(gan, d, fig / "top_units.png")
        render_intervention(gan, d, res, fig / "interventions.png")
        for fam in dirs:
            render_traversal(gan, tr, fam, fig / f"traversal_{fam}.png")
        (fig / "measure.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
