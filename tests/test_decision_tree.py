"""The decision tree over rationales (algorithms/decision_tree/): the closed-form mode against its definition, the
rationales against autograd on briefly trained models, planted decision modes recovered on a toy problem, the
typed result, the callback, and (slow, the shared trained cnn) the modes of `shapes` against the class definitions."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from algorithms.decision_tree import DecisionTreeResult, Labels, Rationales, build_tree, collect_rationales, explain
from algorithms.decision_tree.build import agglomerate, mode_fit, mode_weights, unit_rationales
from algorithms.decision_tree.rationale import choose_source, gradient_rationale
from core.errors import ConfigError
from core.results import load_result

# ----- the mode: closed form ------------------------------------------------------------------------------------


def test_mode_is_the_soft_thresholded_sum_and_maximises_the_sparse_cosine_objective():
    s, n = torch.tensor([3.0, -1.0, 0.5]), torch.tensor(2.0)
    # lambda n = 1: S(s, 1) = [2, 0, 0] -> F = 2, w = e1 (hand-computed)
    assert float(mode_fit(s, n, 0.5)) == pytest.approx(2.0)
    assert mode_weights(s, n, 0.5).tolist() == [1.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, generator=g)
    best = float(mode_fit(s, torch.tensor(1.0), 0.3))
    w = torch.nn.functional.normalize(torch.randn(20000, 6, generator=g), dim=1)
    objective = w @ s - 0.3 * w.abs().sum(1)                       # <s, w> - lambda n ||w||_1 on the unit sphere
    assert float(objective.max()) <= best + 1e-6
    w_star = mode_weights(s, torch.tensor(1.0), 0.3)
    assert float(w_star @ s - 0.3 * w_star.abs().sum()) == pytest.approx(best, abs=1e-6)
    near = torch.nn.functional.normalize(w_star + 0.05 * torch.randn(2000, 6, generator=g), dim=1)
    assert float((near @ s - 0.3 * near.abs().sum(1)).max()) <= best + 1e-6


def test_merging_never_improves_the_fit_and_the_merge_order_is_greedy():
    g = torch.Generator().manual_seed(1)
    u = unit_rationales(torch.randn(30, 8, generator=g))
    m = agglomerate(u, 0.05)
    assert m.root == 58 and int(m.counts[m.root]) == 30
    assert bool((m.loss >= -1e-6).all())
    # the first merge is the closest pair by the loss, computed by brute force
    f = mode_fit(u, torch.ones(30), 0.05)
    pair = f[:, None] + f[None] - mode_fit(u[:, None] + u[None], torch.full((30, 30), 2.0), 0.05)
    pair.fill_diagonal_(float("inf"))
    assert float(m.loss[0]) == pytest.approx(float(pair.min()), abs=1e-6)
    assert {int(m.left[0]), int(m.right[0])} == set(divmod(int(pair.argmin()), 30))
    # every leaf appears exactly once as a merged child
    children = torch.cat([m.left, m.right])
    assert sorted(children[children < 30].tolist()) == list(range(30))


# ----- planted modes --------------------------------------------------------------------------------------------
PLANTED = {0: [[0, 1, 2], [3, 4, 5], [6, 7, 8]], 1: [[9, 10, 11]]}   # class -> its modes' units


def planted(per_mode=40, seed=0, units=14):
    """Rationales drawn from known modes: a mode's units carry 1.0/0.8/0.6 (times a random scale per image), every
    unit gets small noise; class 1 has a single mode."""
    g = torch.Generator().manual_seed(seed)
    rho, pred, truth = [], [], []
    for cls, modes in PLANTED.items():
        for m, units_m in enumerate(modes):
            base = torch.zeros(units)
            base[units_m] = torch.tensor([1.0, 0.8, 0.6])
            rho.append(base * (0.5 + torch.rand(per_mode, 1, generator=g)) + 0.05 * torch.randn(per_mode, units,
                                                                                                   generator=g))
            pred += [cls] * per_mode
            truth += [(cls, m)] * per_mode
    rho = torch.cat(rho)
    order = torch.randperm(len(rho), generator=g)
    pred = torch.tensor(pred)[order]
    rho = rho[order]
    truth = [truth[i] for i in order.tolist()]
    return Rationales(rho, rho.sum(1) + 0.5, torch.full((len(rho),), 0.5), pred, "toy", "toy"), truth


def test_tree_recovers_the_planted_modes_and_descent_explains_new_images():
    rat, truth = planted()
    res = build_tree(rat, class_names=["a", "b"])
    assert [len(res.modes(k)) for k in (0, 1)] == [3, 1]
    # each mode holds the 40 images of one planted mode and its weights sit on that mode's units
    for k, modes in PLANTED.items():
        found = sorted(sorted(res.nodes[m].weights) for m in res.modes(k))
        assert found == sorted(modes)
        assert all(res.nodes[m].num_images == 40 for m in res.modes(k))
    assert res.metrics["modes"] == 2.0 and res.metrics["explained_d1"] > 0.9
    assert res.metrics["residual"] == pytest.approx(0.5)
    # new images from the same modes descend into the mode of their generator
    new, new_truth = planted(per_mode=10, seed=7)
    path = [e.path[0] for e in explain(res, new.rho, new.pred)]
    hits = [sorted(res.nodes[p].weights) == PLANTED[c][m] for p, (c, m) in zip(path, new_truth)]
    assert sum(hits) / len(hits) >= 0.95
    # coarser is less specific: one mode for the whole class loses fit (the root of class 0 spans three modes)
    root = res.nodes[res.roots[0]]
    assert len(root.weights) == 9 and res.metrics["fit_d1"] > 0.9


def test_a_single_planted_mode_is_not_split():
    rat, _ = planted()
    keep = rat.pred == 1
    one = Rationales(rat.rho[keep], rat.scores[keep], rat.residual[keep], rat.pred[keep], "toy", "toy")
    res = build_tree(one, num_classes=2)
    assert res.roots[0] == -1 and len(res.modes(1)) == 1


def test_result_round_trips_and_bad_settings_name_the_option(tmp_path):
    rat, _ = planted(per_mode=8)
    labels = Labels(torch.tensor([1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 0, 0]), ["-"] + [f"c{i}" for i in range(1, 9)],
                    {0: [1, 3], 1: [7]})
    res = build_tree(rat, labels=labels, shuffles=10)
    again = load_result(res.save(tmp_path / "decision_tree.json"))
    assert isinstance(again, DecisionTreeResult) and again == res
    assert res.unit_labels[:3] == ["c1", "c1", "c2"] and res.definitions == {0: ["c1", "c3"], 1: ["c7"]}
    # class 1's single mode sits on units 9-11 = concepts c7, c7, c8: its top concept c7 defines the class
    mode = res.nodes[res.modes(1)[0]]
    assert next(iter(mode.concepts)) == "c7" and mode.defining_share == pytest.approx(
        mode.concepts["c7"], abs=1e-9)
    for bad, match in (({"sparsity": 1.5}, "sparsity"), ({"mode_loss": -1}, "mode_loss"),
                       ({"max_modes": 0}, "max_modes")):
        with pytest.raises(ConfigError, match=match):
            build_tree(rat, **bad)


# ----- rationales against autograd ------------------------------------------------------------------------------


def briefly_trained(model, steps=5, seed=0):
    """A few Adam steps on random images with random labels: weights away from their initialisation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, model.num_classes, (16,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x


@pytest.mark.parametrize("kind", ["cnn", "icnn", "dynconn"])
def test_rationale_sums_to_the_score_minus_the_bias_and_matches_autograd(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        from models.cnn import CNNClassifier
        model = CNNClassifier(num_classes=4, image_size=32, widths=(8, 8, 16, 16))
    elif kind == "icnn":
        from models.icnn import ICNNClassifier
        model = ICNNClassifier(num_classes=4, image_size=32, widths=(8, 8, 16, 16), filters=16)
    else:
        from models.dynconn import DynConnClassifier
        model = DynConnClassifier(num_classes=4, image_size=32, widths=(8, 8, 16, 16), k=3)
    model, x = briefly_trained(model)
    loader = DataLoader([{"image": im} for im in x], batch_size=8)
    exact = collect_rationales(model, loader)
    assert exact.source == "unit_head" and exact.layer == model.unit_layer
    logits = model(x).detach()
    y = logits.gather(1, exact.pred[:, None])[:, 0]
    bias = model.head.bias[exact.pred].detach()
    assert torch.allclose(exact.scores, y, atol=1e-5)
    assert torch.allclose(exact.rho.sum(1), y - bias, atol=1e-5)       # no remainder for a linear head
    if kind == "dynconn":
        # only the routed top-K connections contribute
        assert int((exact.rho != 0).sum(1).max()) <= 3
        return
    # gradient x activation on the layer the head pools (the icnn's masked maps) is the same decomposition
    layer = "icnn.masked1" if kind == "icnn" else model.unit_layer
    rho, y_grad, pred = gradient_rationale(model, x, layer)
    assert torch.equal(pred, exact.pred)
    assert torch.allclose(rho, exact.rho, atol=1e-5)
    assert torch.allclose(rho.sum(1), y_grad - bias, atol=1e-5)
    # and by autograd directly: d y / d(pooled unit) = W_pred, times the pooled unit
    a, w = model.unit_contributions(x)
    assert torch.allclose(exact.rho, (a * w[exact.pred]).detach(), atol=1e-6)


def test_protopnet_rationale_is_over_its_prototypes_and_sums_to_the_score():
    from models.protopnet import ProtoPNet
    torch.manual_seed(0)
    model = ProtoPNet(num_classes=4, image_size=32, widths=(8, 8, 16, 16), prototypes_per_class=2,
                      prototype_dim=16).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rat = collect_rationales(model, DataLoader([{"image": im} for im in x], batch_size=4))
    assert rat.source == "unit_head" and rat.layer == "prototypes" and rat.rho.shape == (8, 8)
    y = model(x).detach().gather(1, rat.pred[:, None])[:, 0]
    # logit_c = sum_j sim_j w_cj (no bias): the similarities x last-layer weights are the whole score
    assert torch.allclose(rat.rho.sum(1), y, atol=1e-5) and float(rat.residual.abs().max()) < 1e-5


def test_gradient_rationale_of_a_nonlinear_head_reports_its_taylor_remainder():
    from models.icnn import ICNNClassifier
    torch.manual_seed(0)
    model, x = briefly_trained(ICNNClassifier(num_classes=4, image_size=32, widths=(8, 8, 16, 16), filters=16))
    rat = collect_rationales(model, DataLoader([{"image": im} for im in x], batch_size=8), layer="backbone.conv4")
    assert rat.source == "gradient" and rat.layer == "backbone.conv4" and rat.rho.shape == (16, 16)
    bias = model.head.bias[rat.pred].detach()
    # the conv + position mask above conv4 is not linear: the remainder is there and is what `residual` holds
    assert torch.allclose(rat.residual, rat.scores - rat.rho.sum(1), atol=1e-5)
    assert float((rat.residual - bias).abs().max()) > 1e-4


def test_source_choice_and_its_errors():
    from tests.test_dissection import toy_net
    net = toy_net()
    assert choose_source(net, None, "auto") == ("gradient", "4")
    with pytest.raises(ConfigError, match="source=unit_head"):
        choose_source(net, None, "unit_head", option="source")
    with pytest.raises(ConfigError, match="choose one of"):
        choose_source(net, None, "exact")
    from models.cnn import CNNClassifier
    cnn = CNNClassifier(num_classes=3, image_size=16, widths=(4, 8, 8, 8))
    assert choose_source(cnn, "backbone.conv3", "auto") == ("gradient", "backbone.conv3")
    with pytest.raises(ConfigError, match="unit_layer"):
        choose_source(cnn, "backbone.conv3", "unit_head")


# ----- the callback ---------------------------------------------------------------------------------------------


def test_callback_writes_json_figure_and_table_from_the_dissection_labels(tmp_path):
    from callbacks.decision_tree import DecisionTreeCallback
    from callbacks.dissection import DissectionCallback
    from tests.test_dissection import ToyDataModule, ToyProbe, all_hooks, fake_trainer, small_cnn
    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=24, size=16))
    dm.class_names = ["a", "b", "c"]
    dcb = DissectionCallback(probe_size=24, gallery_units=0, on_error="raise")
    tcb = DecisionTreeCallback(on_error="raise", shuffles=5)
    trainer = fake_trainer(tmp_path, dm)
    trainer.callbacks = [tcb, dcb]
    model.train()
    for cb in trainer.callbacks:
        cb.setup(trainer, model, "fit")
    tcb.on_train_epoch_end(trainer, model)
    assert model.training and all_hooks(model) == 0
    out = tmp_path / "interp" / "decision_tree" / "epoch_000"
    res = DecisionTreeResult.load(out / "decision_tree.json")
    assert (out / "decision_tree.png").stat().st_size > 1000 and (out / "modes.csv").is_file()
    assert res.layer == "backbone.conv4" and res.source == "unit_head" and res.num_images == 24
    m = tcb.last_metrics
    assert m["interp/decision_tree/modes"] == res.metrics["modes"] >= 1
    assert {"explained_d1", "fit_d3", "modes_d2"} <= set(res.metrics)
    with pytest.raises(ConfigError, match="figure_depth"):
        DecisionTreeCallback(max_depth=2, figure_depth=3)
    with pytest.raises(ConfigError, match="callbacks.decision_tree.sparsity"):
        DecisionTreeCallback(sparsity=2)


# ----- shapes: modes against the class definitions (the shared trained cnn) ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the shared trained_cnn fixture trains the default cnn when its cache is cold
def test_shapes_modes_name_the_defining_concepts_more_often_than_shuffled_labels(trained_cnn):
    from algorithms.dissection import dissect
    model, dm = trained_cnn
    probe = dm.probe_dataset("val")
    loader = DataLoader(Subset(probe, range(min(500, len(probe)))), batch_size=100)
    layer = model.unit_layer
    dissection = dissect(model, [layer], loader)[layer]
    rat = collect_rationales(model, loader)
    res = build_tree(rat, labels=Labels.from_dissection(dissection, probe.class_concepts),
                     class_names=dm.class_names)
    m = res.metrics
    print({k: round(v, 3) for k, v in m.items()})
    for k in range(3):
        print([res.statement(v) for v in res.modes(k)])
    assert m["mode_names_defining"] >= m["mode_names_defining_shuffled"] + 0.2
    assert m["mode_defining_share"] >= m["mode_defining_share_shuffled"] + 0.1
    assert m["explained_d1"] > 0.3


def test_compare_shows_the_tree_columns(tmp_path):
    import json

    import compare
    for name, names in (("cnn", 0.6), ("icnn", 0.9)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"status": "completed", "metrics": {
            "val/acc": 0.9, "interp/decision_tree/modes": 2.0, "interp/decision_tree/explained_d1": 0.8,
            "interp/decision_tree/mode_names_defining": names,
            "interp/decision_tree/mode_names_defining_shuffled": 0.3}}))
    runs = compare.gather([tmp_path])
    cols = compare.metric_columns(runs, list(compare.DEFAULT_METRICS))
    assert cols == ["val/acc", "interp/decision_tree/modes", "interp/decision_tree/explained_d1",
                    "interp/decision_tree/mode_names_defining", "interp/decision_tree/mode_names_defining_shuffled"]


def _ddp_tree(rank, world_size, configs):
    """Per config of shard sizes, rank r reads images [start_r, start_r + sizes[r]) of a fixed set (a shard may be
    empty); one process launch for all configs (spawning costs more than the checks)."""
    from models.cnn import CNNClassifier
    torch.manual_seed(0)
    model = CNNClassifier(num_classes=3, image_size=16, widths=(4, 8, 8, 8)).eval()
    out = []
    for sizes in configs:
        x = torch.rand(sum(sizes), 3, 16, 16, generator=torch.Generator().manual_seed(3))
        start = sum(sizes[:rank])
        loader = DataLoader([{"image": im} for im in x[start:start + sizes[rank]]], batch_size=4)
        out.append(build_tree(collect_rationales(model, loader), num_classes=3, min_images=1).to_json())
    return out


def test_ddp_ranks_build_the_single_process_tree():
    from tests.ddp_utils import run_ddp
    configs = [(6, 4), (10, 0)]
    single = _ddp_tree(0, 1, [(10,)])[0]
    outs = run_ddp(_ddp_tree, 2, (configs,), timeout_s=120)
    for k in range(len(configs)):
        assert outs[0][k] == outs[1][k]
        assert outs[0][k]["num_images"] == single["num_images"] == 10
        assert outs[0][k]["metrics"] == pytest.approx(single["metrics"], abs=1e-5)
