"""Dissection and composability on `shapes` with the default cnn after its default training (the shared
`trained_cnn` fixture), against the data's ground truth, and end to end through train() into metrics.json."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from algorithms.composability import compose
from algorithms.dissection import dissect

PROBE_IMAGES = 500


def defining_concepts_found(result, class_concepts) -> tuple[float, list[str]]:
    defining = sorted({c for ids in class_concepts.values() for c in ids})
    labels = set(result.unit_concepts().tolist()) - {0}
    found = [result.concept_names[c] for c in defining if c in labels]
    return len(found) / len(defining), found


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the shared trained_cnn fixture trains the default cnn when its cache is cold
def test_trained_cnn_units_detect_the_defining_concepts(trained_cnn):
    model, dm = trained_cnn
    probe = dm.probe_dataset("val")
    loader = DataLoader(Subset(probe, range(min(PROBE_IMAGES, len(probe)))), batch_size=100)
    layer = model.default_probe_layer
    trained = dissect(model, [layer], loader)[layer]
    frac, found = defining_concepts_found(trained, probe.class_concepts)

    from models.cnn import CNNClassifier
    torch.manual_seed(0)
    untrained_model = CNNClassifier(**{k: v for k, v in model.hparams.items()
                                       if k in ("num_classes", "channels", "image_size", "backbone", "widths")}).eval()
    untrained = dissect(untrained_model, [layer], loader)[layer]
    frac_u, found_u = defining_concepts_found(untrained, probe.class_concepts)
    s, su = trained.summary(), untrained.summary()
    print(f"\n{layer}: trained: defining concepts found {frac:.2f} {found}; {s['interpretable_units']:.0f} "
          f"interpretable units, {s['unique_concepts']:.0f} concepts, mean best IoU {s['mean_best_iou']:.3f}")
    print(f"{layer}: untrained: defining concepts found {frac_u:.2f} {found_u}; {su['interpretable_units']:.0f} "
          f"interpretable units, {su['unique_concepts']:.0f} concepts, mean best IoU {su['mean_best_iou']:.3f}")
    assert frac >= 0.8
    assert frac_u <= frac - 0.25 or su["interpretable_units"] <= 0.5 * s["interpretable_units"]
    assert su["mean_best_iou"] < s["mean_best_iou"]

    comp = compose(model, loader, trained, class_names=dm.class_names, class_concepts=probe.class_concepts)
    m = comp.metrics
    print("composability:", {k: round(v, 3) for k, v in m.items()})
    for c in comp.classes[:4]:
        print("  ", c.statement(), "| IBD:", next(b.statement for b in comp.ibd if b.name == c.name))
    assert m["agreement_recall"] >= 0.5 and m["concept_coverage"] > 0.3


@pytest.mark.slow
def test_default_callbacks_end_to_end_write_metrics_json(run_train, tmp_path):
    out = tmp_path / "run"
    run_train(["model=cnn", "logger=none", "trainer.max_epochs=1", "datamodule.n_train=240", "datamodule.n_val=120",
               "datamodule.n_test=60", "callbacks.dissection.probe_size=120"],
              out)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("interp/dissection/interpretable_units", "interp/dissection/unique_concepts",
                "interp/dissection/category/object", "interp/composability/completeness",
                "interp/composability/agreement_precision", "interp/composability/ibd_residual"):
        assert key in metrics, key
    d = out / "interp" / "dissection" / "epoch_000"
    assert (d / "backbone.conv4.csv").is_file() and (d / "backbone.conv4_gallery.png").is_file()
    from algorithms.composition_result import CompositionResult
    from algorithms.dissection_result import DissectionEpoch
    comp = CompositionResult.load(out / "interp" / "composability" / "epoch_000" / "composability.json")
    assert comp.layer == "backbone.conv4" and comp.metrics["completeness"] == pytest.approx(
        metrics["interp/composability/completeness"])
    dissection = DissectionEpoch.load(d / "dissection.json")["backbone.conv4"]
    assert dissection.summary()["interpretable_units"] == metrics["interp/dissection/interpretable_units"]
