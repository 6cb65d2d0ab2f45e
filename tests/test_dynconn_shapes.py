"""Dynamic-K on the shapes concept data: it learns, and its decisions need fewer units for 90% of the evidence than
the dense head of the cached default cnn (same backbone)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("datamodules.shapes", reason="needs the datamodules (feat/data)")

from callbacks.dynconn_stats import predicted_evidence, units_for_evidence  # noqa: E402


@pytest.mark.slow
def test_dynconn_learns_shapes_with_sparser_evidence_than_dense_head(run_train, trained_cnn):
    # the default 6000 training images, 5 of the default 8 epochs, only the Dynamic-K statistics (0.81 here)
    metrics = run_train(["model=dynconn", "model.k=5", "logger=none", "callbacks=[minimal,dynconn_stats]",
                         "trainer.max_epochs=5", "seed=0"])
    assert metrics["test/acc"] > 0.7  # 12 classes: chance is 0.083
    dyn_units = metrics["interp/dynconn/units_for_90pct"]
    assert 1.0 <= dyn_units <= 5.0  # only the K routed units carry evidence
    cnn, dm = trained_cnn
    x = torch.stack([dm.val_dataloader().dataset[i][0] for i in range(128)])
    with torch.no_grad():
        evidence, _, _ = predicted_evidence(cnn, x)
    dense_units = float(units_for_evidence(evidence, 0.9).float().mean())
    assert dyn_units < dense_units, (dyn_units, dense_units)
