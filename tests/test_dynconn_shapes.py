"""Dynamic-K on the shapes concept data: it learns as well as the cached default cnn (same backbone), and its
decisions need fewer units for 90% of the evidence than the dense head."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("datamodules.shapes", reason="needs the datamodules (feat/data)")

from algorithms.dynk_stats import predicted_evidence, units_for_evidence  # noqa: E402


@pytest.mark.slow
def test_dynconn_learns_shapes_with_sparser_evidence_than_dense_head(run_train, trained_cnn, trained_cnn_run):
    """The issue's bar: test accuracy within 2 points of the default cnn (same backbone, same 8 epochs), with fewer
    units for 90% of the evidence. Measured: 0.987 against the cached cnn's 0.966."""
    import json
    metrics = run_train(["model=dynconn", "model.k=5", "logger=none", "callbacks=minimal", "callbacks.interpretation=true", "seed=0"])
    cnn_acc = json.loads((trained_cnn_run / "metrics.json").read_text())["metrics"]["test/acc"]
    assert metrics["test/acc"] >= cnn_acc - 0.02, (metrics["test/acc"], cnn_acc)
    dyn_units = metrics["interp/dynconn/units_for_90pct"]
    assert 1.0 <= dyn_units <= 5.0  # only the K routed units carry evidence
    cnn, dm = trained_cnn
    x = torch.stack([dm.val_dataloader().dataset[i][0] for i in range(128)])
    with torch.no_grad():
        evidence, _, _ = predicted_evidence(cnn, x)
    dense_units = float(units_for_evidence(evidence, 0.9).float().mean())
    assert dyn_units < dense_units, (dyn_units, dense_units)
