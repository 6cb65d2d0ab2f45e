"""ProtoPNet units: distances, losses against hand-computed values, push against brute force (also under 2-process
DDP), receptive fields and boxes, the schedule plan, bad configuration."""
from __future__ import annotations

import math

import pytest
import torch

from core.errors import ConfigError
from models.protopnet import ProtoPNet, ProtoPNetSchedule, masked_min, squared_distances
from models.protopnet_push import (high_activation_boxes, k_nearest_patches, push_prototypes, receptive_field,
                                   shard_loader)


def tiny_model(seed: int = 0, **kw) -> ProtoPNet:
    torch.manual_seed(seed)
    args = dict(num_classes=3, channels=3, image_size=16, prototypes_per_class=2, prototype_dim=6, widths=[4, 8])
    args.update(kw)
    return ProtoPNet(**args).eval()


def toy_batches(n: int = 12, seed: int = 1, batch: int = 5, classes: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    idx = torch.arange(n)
    return [(x[i:i + batch], y[i:i + batch], idx[i:i + batch]) for i in range(0, n, batch)], x, y


def test_distances_equal_brute_force():
    torch.manual_seed(0)
    z, p = torch.rand(2, 5, 3, 4) * 3, torch.rand(7, 5) * 3
    d = squared_distances(z, p)
    brute = torch.zeros(2, 7, 3, 4)
    for b in range(2):
        for j in range(7):
            for h in range(3):
                for w in range(4):
                    brute[b, j, h, w] = ((z[b, :, h, w] - p[j]) ** 2).sum()
    assert torch.allclose(d, brute, atol=1e-5)
    # a prototype equal to a patch is at distance ~0 (the expansion's rounding), never negative (clamped)
    same = squared_distances(z * 100, z[0, :, 1, 2][None] * 100)
    assert float(same.min()) >= 0.0 and float(same[0, 0, 1, 2]) < 1e-2


def test_similarity_and_min_pooling():
    m = tiny_model()
    d = torch.tensor([[[[0.0, 4.0]], [[9.0, 1.0]], [[2.0, 2.0]], [[5.0, 3.0]], [[1.0, 8.0]], [[6.0, 7.0]]]])
    out = m.outputs_from_distances(d)
    assert out.min_distances.tolist() == [[0.0, 1.0, 2.0, 3.0, 1.0, 6.0]]
    assert math.isclose(float(out.similarities[0, 0]), math.log(1 / 1e-4), rel_tol=1e-6)
    assert math.isclose(float(out.similarities[0, 1]), math.log(2 / (1 + 1e-4)), rel_tol=1e-6)
    # last layer init: +1 own class, -0.5 others
    w = m.last_layer.weight
    assert w[0, 0] == 1 and w[0, 1] == 1 and w[0, 2] == -0.5 and w[2, 5] == 1 and w[1, 4] == -0.5
    assert torch.allclose(out.logits, out.similarities @ w.t())
    lin = tiny_model(similarity="linear")
    assert torch.equal(lin.outputs_from_distances(d).similarities, -out.min_distances)


def test_cluster_and_separation_hand_computed_above_feature_dim():
    # D = 6, distances well above D: the public code's max(D - d) form would return garbage here
    m = tiny_model(num_classes=2, prototypes_per_class=2, coefs={"crs_ent": 1.0, "clst": 0.8, "sep": 0.08, "l1": 1e-4})
    min_d = torch.tensor([[1.0, 7.0, 20.0, 30.0], [12.0, 5.0, 3.0, 40.0]])
    y = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.0]])
    from models.protopnet import PrototypeOutputs
    loss, t = m.compute_loss(PrototypeOutputs(logits, min_d, torch.zeros_like(min_d)), y, "train")
    assert math.isclose(float(t["cluster"]), (1 + 3) / 2)
    assert math.isclose(float(t["separation"]), (20 + 5) / 2)
    assert math.isclose(float(t["avg_separation"]), ((20 + 30) / 2 + (12 + 5) / 2) / 2)
    assert math.isclose(float(t["l1"]), 0.5 * 4)  # 4 off-class connections at -0.5
    ce = float(torch.nn.functional.cross_entropy(logits, y))
    assert math.isclose(float(loss.detach()), ce + 0.8 * 2 - 0.08 * 12.5 + 1e-4 * 2, rel_tol=1e-6)
    assert float(masked_min(min_d, torch.tensor([[False] * 4, [True] * 4]))[0]) == math.inf


def brute_force_push(model, x, y):
    """Python loops over prototypes, own-class images and positions."""
    with torch.no_grad():
        z = model.prototype_features(x)
    best = {}
    for j in range(model.num_prototypes):
        c = int(model.prototype_classes[j])
        for i in range(len(x)):
            if int(y[i]) != c:
                continue
            for h in range(z.shape[2]):
                for w in range(z.shape[3]):
                    d = float(((z[i, :, h, w] - model.prototype_vectors[j].detach()) ** 2).sum())
                    if j not in best or d < best[j][0]:
                        best[j] = (d, i, h, w, z[i, :, h, w].clone())
    return best


def test_push_finds_global_argmin_of_own_class_only():
    model = tiny_model()
    batches, x, y = toy_batches()
    with torch.no_grad():  # plant prototype 0 (class 0) on a patch of a class-1 image: push must not take it
        model.prototype_vectors[0] = model.prototype_features(x[1:2])[0, :, 3, 4]
    result = push_prototypes(model, batches)
    brute = brute_force_push(model, x, y)
    for j in range(model.num_prototypes):
        d, i, h, w, feat = brute[j]
        assert int(y[result.image_index[j]]) == int(model.prototype_classes[j])
        assert int(result.image_index[j]) == i and result.position[j].tolist() == [h, w]
        assert math.isclose(float(result.distance[j]), d, rel_tol=1e-4, abs_tol=1e-6)
        assert torch.allclose(result.prototypes[j], feat)
    assert int(result.image_index[0]) != 1  # the planted class-1 patch (distance 0) was ignored
    # after the push every prototype sits on its source patch: distance ~0 there, and the map peaks there
    with torch.no_grad():
        model.prototype_vectors.copy_(result.prototypes)
        d = model.distances(model.prototype_features(x))
    for j in range(model.num_prototypes):
        i, (h, w) = int(result.image_index[j]), result.position[j].tolist()
        assert float(d[i, j, h, w]) < 1e-5
        assert float(result.activation[j, h, w]) == pytest.approx(math.log(1 / 1e-4), rel=1e-3)


def test_push_keeps_prototypes_of_a_class_without_images():
    model = tiny_model()
    batches, x, y = toy_batches()
    only01 = [(bx[by < 2], by[by < 2], bi[by < 2]) for bx, by, bi in batches]
    before = model.prototype_vectors.detach().clone()
    with pytest.warns(UserWarning, match="no push image of class"):
        result = push_prototypes(model, only01)
    assert result.pushed.tolist() == [True] * 4 + [False] * 2
    assert torch.equal(result.prototypes[4:], before[4:])
    assert result.image_index[4:].tolist() == [-1, -1]


def test_receptive_field_and_high_activation_box():
    model = tiny_model()
    # small convnet, widths (4, 8) at 16 px: conv3 (r 3), pool2 (r 4, jump 2, first centre 1.0 = between
    # pixels 0 and 1), conv3 (r 8)
    assert receptive_field(model.backbone) == (8.0, 2.0, 1.0)
    import torchvision
    net = torchvision.models.vgg16(weights=None).features[:-1]  # ProtoPNet's VGG16: 196 px fields, stride 16
    size, jump, _ = receptive_field(net)
    assert (size, jump) == (196.0, 16.0)
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 5.0
    box = high_activation_boxes(maps, 16)[0].tolist()
    y0, y1, x0, x1 = box
    assert y0 <= 5 < y1 and x0 <= 9 < x1 and (y1 - y0) * (x1 - x0) < 16 * 16 * 0.2


def test_k_nearest_patches_brute_force():
    model = tiny_model()
    batches, x, y = toy_batches()
    near = k_nearest_patches(model, batches, k=3, one_per_image=True)
    with torch.no_grad():
        d = model.distances(model.prototype_features(x)).flatten(2).min(dim=2).values  # [N, m]
    order = d.t().argsort(dim=1)[:, :3]
    assert torch.equal(near.image_index, order)
    assert torch.equal(near.labels, y[order])


def _ddp_push(rank, world_size):
    model = tiny_model()
    batches, x, y = toy_batches(n=13)
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(len(x)))
    loader = shard_loader(torch.utils.data.DataLoader(ds, batch_size=4))
    r = push_prototypes(model, loader)
    near = k_nearest_patches(model, loader, k=4)
    return {"prototypes": r.prototypes, "index": r.image_index, "pos": r.position, "act": r.activation,
            "box": r.high_activation_box, "near": near.image_index, "near_pos": near.position,
            "rank_images": len(loader.dataset)}


@pytest.mark.ddp
def test_push_under_ddp_equals_single_process():
    from tests.ddp_utils import run_ddp
    results = run_ddp(_ddp_push, 2)
    model = tiny_model()
    batches, x, y = toy_batches(n=13)
    single = push_prototypes(model, [(x, y, torch.arange(len(x)))])
    near = k_nearest_patches(model, [(x, y, torch.arange(len(x)))], k=4)
    assert [r["rank_images"] for r in results] == [7, 6]
    for r in results:  # identical on every rank, equal to one process
        assert torch.equal(r["index"], single.image_index) and torch.equal(r["pos"], single.position)
        assert torch.allclose(r["prototypes"], single.prototypes, atol=1e-6)
        assert torch.allclose(r["act"], single.activation, atol=1e-4)
        assert torch.equal(r["box"], single.high_activation_box)
        assert torch.equal(r["near"], near.image_index) and torch.equal(r["near_pos"], near.position)
    assert torch.equal(results[0]["prototypes"], results[1]["prototypes"])


def test_schedule_plan():
    s = ProtoPNetSchedule(warm_epochs=2, push_start=3, push_every=2, last_layer_epochs=2, final_push=False)
    phases, pushes = s.plan(10)
    assert phases == ["warm", "warm", "joint", "last_layer", "last_layer", "joint", "joint", "last_layer",
                      "last_layer", "joint"]
    assert pushes == {3, 7}
    # final_push: the run ends in a full push block
    phases, pushes = ProtoPNetSchedule(warm_epochs=2, push_start=3, push_every=2, last_layer_epochs=2).plan(10)
    assert phases[-4:] == ["joint", "last_layer", "last_layer", "last_layer"] and pushes == {3, 7}
    phases, pushes = ProtoPNetSchedule(warm_epochs=2, push_start=3, push_every=3, last_layer_epochs=2).plan(10)
    assert phases[-3:] == ["joint", "last_layer", "last_layer"] and pushes == {3, 8}
    # the cut falls inside a block: that block is extended, no double push
    phases, pushes = ProtoPNetSchedule(warm_epochs=1, push_start=2, push_every=5, last_layer_epochs=2).plan(6)
    assert phases == ["warm", "joint", "last_layer", "last_layer", "last_layer", "last_layer"] and pushes == {2}
    # the paper's schedule: 5 warm, first push after 10 warm/joint epochs, 20 last-layer passes
    phases, pushes = ProtoPNetSchedule(final_push=False).plan(60)
    assert phases[:5] == ["warm"] * 5 and min(pushes) == 10 and phases[10:30] == ["last_layer"] * 20
    assert ProtoPNetSchedule().phase(31, None) == ("joint", False)


@pytest.mark.parametrize("kwargs, option", [
    ({"prototypes_per_class": 0}, "model.prototypes_per_class"),
    ({"similarity": "cosine"}, "model.similarity"),
    ({"schedule": {"last_layer_epochs": 0}}, "model.schedule.last_layer_epochs"),
    ({"phase_lrs": {"warm": {"head": 1e-3}, "joint": {"backbone": 1e-4}, "last_layer": {"last_layer": 1e-4}}},
     "model.phase_lrs.warm"),
    ({"backbone": "resnet18", "image_size": 28}, "datamodule.image_size"),
    ({"backbone": "vgg16", "image_size": 8}, "datamodule.image_size"),
])
def test_bad_config_names_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        tiny_model(**kwargs)


def test_short_runs_shrink_the_final_block():
    with pytest.warns(UserWarning, match="trainer.max_epochs=3"):
        assert ProtoPNetSchedule(warm_epochs=2, last_layer_epochs=3).plan(3) == (["warm", "warm", "last_layer"], {2})
    with pytest.warns(UserWarning, match="too short for a push"):
        assert ProtoPNetSchedule(last_layer_epochs=3).plan(1) == (["warm"], set())


def test_pruning_follows_the_nearest_patch_rule():
    model = tiny_model(prune={"enabled": True, "k": 6, "min_own_class": 3})
    batches, x, y = toy_batches(n=15)
    with torch.no_grad():
        d = model.distances(model.prototype_features(x)).flatten(2).min(dim=2).values  # [N, m]
    nearest = d.t().argsort(dim=1)[:, :6]
    own = (y[nearest] == model.prototype_classes[:, None]).sum(dim=1)
    expect = (own < 3).nonzero().flatten().tolist()
    assert 0 < len(expect) < model.num_prototypes  # the toy data makes the test meaningful
    pruned = model.prune(batches)
    assert pruned == expect
    assert model.prototype_active.tolist() == [j not in expect for j in range(model.num_prototypes)]
    assert bool((model.last_layer.weight[:, expect] == 0).all())
    out = model.prototype_outputs(x)
    assert bool((out.similarities[:, expect] == 0).all())
