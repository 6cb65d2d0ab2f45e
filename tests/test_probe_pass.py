"""One probe pass per epoch (algorithms/probe_pass.py): dissection and composability read the maps and the unit
contributions of one forward pass over the probe set, with the results of their own separate passes (to 1e-6)."""
from __future__ import annotations

import torch

from callbacks.composability import ComposabilityCallback
from callbacks.dissection import DissectionCallback
from tests.test_dissection import ToyDataModule, ToyProbe, fake_trainer, small_cnn

N, BATCH = 24, 10


def _epoch(tmp_path, cache_mb):
    """Dissection of conv3 + composability of the unit layer conv4 (a second dissected layer) after one epoch;
    returns the callbacks and the number of probe images that went through the model's first stage."""
    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=N, size=16))
    dm.class_names = ["a", "b", "c"]
    dcb = DissectionCallback(layers=["backbone.conv3"], probe_size=N, gallery_units=0, batch_size=BATCH,
                             cache_mb=cache_mb, every_n_epochs=1, on_error="raise")
    ccb = ComposabilityCallback(batch_size=BATCH, every_n_epochs=1, on_error="raise")
    trainer = fake_trainer(tmp_path, dm)
    trainer.callbacks = [dcb, ccb]
    for cb in trainer.callbacks:
        cb.setup(trainer, model, "fit")
    images = []
    handle = model.backbone.stages[0].register_forward_hook(lambda m, i, o: images.append(len(o)))
    try:
        for cb in trainer.callbacks:
            cb.on_train_epoch_end(trainer, model)
    finally:
        handle.remove()
    return dcb, ccb, sum(images)


def test_shared_probe_pass_gives_the_separate_passes_results_with_one_forward_pass(tmp_path):
    shared_d, shared_c, shared_images = _epoch(tmp_path / "shared", cache_mb=2048)
    # cache_mb=0: no shared pass (and dissection reads the probe set twice): every method runs its own passes
    alone_d, alone_c, alone_images = _epoch(tmp_path / "alone", cache_mb=0)
    # shared: one pass over the N probe images + head_bias's two of one image; alone: conv3 and conv4 dissected with
    # two passes each, composability one more
    assert shared_images == N + 2
    assert alone_images == 5 * N + 2
    layers = ["backbone.conv3", "backbone.conv4"]
    for layer in layers:
        a = shared_d.dissections(None, None, 0, [layer])[layer] if layer != layers[0] else shared_d.results[layer]
        b = alone_d.dissections(None, None, 0, [layer])[layer] if layer != layers[0] else alone_d.results[layer]
        for key in ("thresholds", "intersection", "unit_area", "concept_area", "top_scores", "concept_feature_sum",
                    "feature_sum"):
            torch.testing.assert_close(getattr(a, key).double(), getattr(b, key).double(), atol=1e-6, rtol=1e-6)
        assert torch.equal(a.top_images, b.top_images) and a.labels() == b.labels()
    assert shared_c.last_metrics.keys() == alone_c.last_metrics.keys() and shared_c.last_metrics
    for key, value in shared_c.last_metrics.items():
        assert abs(value - alone_c.last_metrics[key]) <= 1e-6, key
    for a, b in zip(shared_c.result.classes, alone_c.result.classes):
        assert a.name == b.name and a.num_images == b.num_images
        assert a.concept_shares.keys() == b.concept_shares.keys()
        assert all(abs(a.concept_shares[k] - b.concept_shares[k]) <= 1e-6 for k in a.concept_shares)


def test_the_next_epochs_pass_reuses_the_label_tensors_and_gives_the_same_results(tmp_path, monkeypatch):
    """The union labels (dissection_stats.union_labels) depend on the probe labels alone: the first epoch computes
    them once per batch for all layers and both statistics; the next epoch's pass carries them over (no new call)
    and its dissection equals one computed from scratch."""
    import algorithms.dissection as dissection_module
    from tests.test_dissection import fake_trainer as trainer_at

    calls = []
    real = dissection_module.union_labels
    monkeypatch.setattr(dissection_module, "union_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=N, size=16))
    cb = DissectionCallback(layers=["backbone.conv3", "backbone.conv4"], probe_size=N, gallery_units=0,
                            batch_size=BATCH, every_n_epochs=1, on_error="raise")
    fresh = DissectionCallback(layers=["backbone.conv3", "backbone.conv4"], probe_size=N, gallery_units=0,
                               batch_size=BATCH, every_n_epochs=1, on_error="raise")
    batches = -(-N // BATCH)
    for epoch in range(2):
        trainer = trainer_at(tmp_path / "a", dm, epoch=epoch, max_epochs=2)
        if epoch == 0:
            cb.setup(trainer, model, "fit")
        cb.on_train_epoch_end(trainer, model)
        # epoch 0: once per batch (not per layer and statistic); epoch 1: none
        assert len(calls) == batches, (epoch, len(calls))
        if epoch == 0:
            first = [b["seg_union"] for b in cb._last_pass.batches]
    assert all(b["seg_union"] is f for b, f in zip(cb._last_pass.batches, first))
    trainer = trainer_at(tmp_path / "b", dm, epoch=1, max_epochs=2)
    fresh.setup(trainer, model, "fit")
    fresh.on_train_epoch_end(trainer, model)
    for layer in ("backbone.conv3", "backbone.conv4"):
        a, b = cb.results[layer], fresh.results[layer]
        for key in ("intersection", "unit_area", "concept_area", "concept_feature_sum"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
