"""One probe pass per epoch (algorithms/probe_pass.py): dissection and composability read the maps and the unit
contributions of one forward pass over the probe set, with the results of their own separate passes (to 1e-6)."""
from __future__ import annotations

import torch

from callbacks.composability import ComposabilityCallback
from callbacks.dissection import DissectionCallback
from tests.test_dissection import ToyDataModule, ToyProbe, fake_trainer, small_cnn

N, BATCH = 24, 10


def _images_through(model, run) -> list[int]:
    """Call run(); the batch sizes that went through the model's first stage meanwhile."""
    seen = []
    handle = model.backbone.stages[0].register_forward_hook(lambda m, i, o: seen.append(len(o)))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _toy_epoch(path, model, callbacks, run) -> list[int]:
    """Set up `callbacks` on the toy probe data and run the epoch end of those in `run`: the batch sizes seen."""
    dm = ToyDataModule(ToyProbe(n=N, size=16))
    dm.class_names = ["a", "b", "c"]
    trainer = fake_trainer(path, dm)
    trainer.callbacks = callbacks
    for cb in callbacks:
        cb.setup(trainer, model, "fit")
    return _images_through(model, lambda: [cb.on_train_epoch_end(trainer, model) for cb in run])


def _epoch(tmp_path, cache_mb):
    """Dissection of conv3 + composability of the unit layer conv4 (a second dissected layer) after one epoch;
    returns the callbacks and the number of probe images that went through the model's first stage."""
    model = small_cnn()
    dcb = DissectionCallback(layers=["backbone.conv3"], probe_size=N, gallery_units=0, batch_size=BATCH,
                             cache_mb=cache_mb, every_n_epochs=1, on_error="raise")
    ccb = ComposabilityCallback(batch_size=BATCH, every_n_epochs=1, on_error="raise")
    return dcb, ccb, sum(_toy_epoch(tmp_path, model, [dcb, ccb], [dcb, ccb]))


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
    """The union labels (dissection_stats.union_labels) depend on the probe labels alone: computed once per batch
    when the probe batches are collated, for all layers and both statistics; the next epoch's pass reads the same
    tensors (no new call) and its dissection equals one computed from scratch."""
    import algorithms.dissection as dissection_module

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
        trainer = fake_trainer(tmp_path / "a", dm, epoch=epoch, max_epochs=2)
        if epoch == 0:
            cb.setup(trainer, model, "fit")
        cb.on_train_epoch_end(trainer, model)
        # epoch 0: once per batch (not per layer and statistic); epoch 1: none
        assert len(calls) == batches, (epoch, len(calls))
        shared = cb.memo(epoch, "probe_pass", lambda: None)
        assert shared is not None and len(shared.batches) == len(cb._collated.batches) == batches
        assert all(a["seg_union"] is b["seg_union"] for a, b in zip(shared.batches, cb._collated.batches))
        if epoch == 0:
            first = [b["seg_union"] for b in cb._collated.batches]
    assert all(b["seg_union"] is f for b, f in zip(cb._collated.batches, first))
    trainer = fake_trainer(tmp_path / "b", dm, epoch=1, max_epochs=2)
    fresh.setup(trainer, model, "fit")
    fresh.on_train_epoch_end(trainer, model)
    for layer in ("backbone.conv3", "backbone.conv4"):
        a, b = cb.results[layer], fresh.results[layer]
        for key in ("intersection", "unit_area", "concept_area", "concept_feature_sum"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key


def _featviz_epoch(tmp_path, with_dissection: bool):
    """featviz's top activations over the first 12 probe images after one epoch, with the run's dissection callback
    (its probe pass holds the layer's maps) or alone; returns (metrics, top indices, images the model saw)."""
    from callbacks.featviz import FeatureVisualizationCallback

    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=N, size=16))
    dm.class_names = ["a", "b", "c"]
    fv = FeatureVisualizationCallback(layer="backbone.conv3", num_units=3, steps=2, k_patches=2, max_images=12,
                                      batch_size=5, every_n_epochs=1, on_error="raise", transforms=False)
    callbacks = [fv]
    if with_dissection:
        callbacks.append(DissectionCallback(layers=["backbone.conv4"], probe_size=N, gallery_units=0,
                                           batch_size=BATCH, every_n_epochs=5, run_on_last_epoch=False))
    trainer = fake_trainer(tmp_path, dm, epoch=0, max_epochs=2)
    trainer.callbacks = callbacks
    for cb in callbacks:
        cb.setup(trainer, model, "fit")
    saved = {}
    real = fv._render
    fv._render = lambda trainer, module, dm, ds, jobs, images, top, result: saved.update(top=top) or real(
        trainer, module, dm, ds, jobs, images, top, result)
    seen = _images_through(model, lambda: fv.on_train_epoch_end(trainer, model))
    return fv.last_metrics, saved["top"], seen


def test_featviz_reads_the_probe_images_maps_from_dissections_pass(tmp_path):
    """With a dissection callback whose probe set starts with featviz's images, featviz's top activations come from
    the epoch's probe pass (conv3 added to it): the same values, images and positions, and the model does not run
    over the 12 images again (the pass runs over dissection's 24, although dissection is not due this epoch)."""
    alone, top_alone, seen_alone = _featviz_epoch(tmp_path / "alone", with_dissection=False)
    shared, top_shared, seen_shared = _featviz_epoch(tmp_path / "shared", with_dissection=True)
    # featviz's own batches of 5, 5 and 2 probe images (the optimisation's batches are 6 jobs, the first capture 1)
    assert seen_alone.count(5) == 2 and seen_alone.count(2) == 1
    assert 5 not in seen_shared and 2 not in seen_shared
    assert seen_shared.count(BATCH) == 2 and seen_shared.count(N - 2 * BATCH) == 1  # the pass over 24 images
    torch.testing.assert_close(top_shared.values, top_alone.values, atol=1e-6, rtol=1e-6)
    assert torch.equal(top_shared.indices, top_alone.indices) and torch.equal(top_shared.positions,
                                                                               top_alone.positions)
    assert alone.keys() == shared.keys() and alone
    for key, value in alone.items():
        assert abs(value - shared[key]) <= 1e-6 * max(1.0, abs(value)), key


def test_decision_tree_reads_the_unit_contributions_from_the_probe_pass(tmp_path):
    """The exact (unit-head) rationales come from the output of unit_contributions that the epoch's probe pass
    holds: the same tree, and no model pass of the tree's own over the probe images (one pass over the 24 images in
    all, plus head_bias's two of one image)."""
    from callbacks.decision_tree import DecisionTreeCallback

    def epoch(path, cache_mb):
        dcb = DissectionCallback(probe_size=N, gallery_units=0, batch_size=BATCH, cache_mb=cache_mb,
                                 on_error="raise")
        tcb = DecisionTreeCallback(on_error="raise", shuffles=5, batch_size=BATCH)
        seen = _toy_epoch(path, small_cnn(), [tcb, dcb], [tcb])
        return tcb.result, sum(seen)

    shared, shared_images = epoch(tmp_path / "shared", 2048)
    alone, alone_images = epoch(tmp_path / "alone", 0)   # no pass kept: the tree reads the probe set itself
    assert shared_images == N + 2 and alone_images == 3 * N + 2  # alone: + dissection's two passes of its own
    assert shared.metrics.keys() == alone.metrics.keys()
    for key, value in alone.metrics.items():
        assert abs(value - shared.metrics[key]) <= 1e-6, key
    assert [n.terms(0.05) for n in shared.nodes] == [n.terms(0.05) for n in alone.nodes]


def test_the_probe_items_are_read_and_collated_once_per_fit(tmp_path):
    """The probe set is the same every epoch: its items are read once (first epoch), and the second epoch's
    dissection, from the kept batches, equals one from a fresh callback that reads them."""

    class Counted(ToyProbe):
        reads = 0

        def __getitem__(self, i):
            Counted.reads += 1
            return super().__getitem__(i)

    model = small_cnn()
    dm = ToyDataModule(Counted(n=N, size=16))
    cb = DissectionCallback(layers=["backbone.conv3"], probe_size=N, gallery_units=0, batch_size=BATCH,
                            every_n_epochs=1, on_error="raise")
    for epoch in range(2):
        trainer = fake_trainer(tmp_path / "a", dm, epoch=epoch, max_epochs=2)
        if epoch == 0:
            cb.setup(trainer, model, "fit")
            Counted.reads = 0
        cb.on_train_epoch_end(trainer, model)
        assert Counted.reads == N, (epoch, Counted.reads)  # N in the first epoch, none in the second
    fresh = DissectionCallback(layers=["backbone.conv3"], probe_size=N, gallery_units=0, batch_size=BATCH,
                               every_n_epochs=1, on_error="raise", cache_mb=0)   # reads the loader every epoch
    trainer = fake_trainer(tmp_path / "b", dm, epoch=1, max_epochs=2)
    fresh.setup(trainer, model, "fit")
    fresh.on_train_epoch_end(trainer, model)
    a, b = cb.results["backbone.conv3"], fresh.results["backbone.conv3"]
    for key in ("thresholds", "intersection", "unit_area", "concept_area", "top_scores"):
        torch.testing.assert_close(getattr(a, key).double(), getattr(b, key).double(), atol=1e-6, rtol=1e-6)
    assert torch.equal(a.top_images, b.top_images)
