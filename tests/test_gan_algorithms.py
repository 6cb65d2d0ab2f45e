"""GAN methods on a generator with planted units (tests/gan_planted.py) and the formulas checked by hand: dissection
recovers each unit's concept, ablating a concept's units removes it (random units do not), insertion makes it
appear, SeFa = the top eigenvectors of A^T A, the Hessian penalty vanishes exactly for a separable G, the Fréchet
distance of Gaussians with known moments, the information quality ratio of identical / independent masks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from algorithms.gan.directions import directions_of, sefa, traverse
from algorithms.gan.dissection import dissect_generator, information_quality_ratio, units_for
from models.gan_metrics import frechet_distance
from models.hessian_penalty import hessian_penalty
from algorithms.gan.interventions import intervene
from algorithms.gan.result import InterventionResult, LatentDirectionsResult
from algorithms.dissection_result import DissectionResult
from core.errors import CapabilityError, ConfigError
from core.results import load_result
from tests.gan_planted import OWNER, PlantedGenerator


@pytest.fixture(scope="module")
def planted():
    return PlantedGenerator()


@pytest.fixture(scope="module", params=["quantile", "iqr"])
def dissected(planted, request):
    return dissect_generator(planted, "units", num_samples=64, batch_size=32, method=request.param)


def test_dissection_recovers_planted_units(dissected):
    concept, iou = dissected.best
    drawing = OWNER > 0
    assert torch.equal(concept[drawing], OWNER[drawing])
    assert (iou[drawing] > dissected.iou_threshold).all()
    assert iou[drawing].min() > 2 * iou[~drawing].max()
    for c in (1, 2, 3):
        assert set(units_for(dissected, c, 3).tolist()) == set((OWNER == c).nonzero().flatten().tolist())


def test_dissection_result_round_trip(dissected, tmp_path):
    path = dissected.save(tmp_path / "d.json")
    back = load_result(path)
    assert isinstance(back, DissectionResult) and back == dissected


def test_ablation_removes_concept_and_insertion_adds_it(planted, tmp_path):
    d = dissect_generator(planted, "units", num_samples=64)
    res = intervene(planted, d, concepts=[1, 2, 3], num_units=3, num_samples=32, random_draws=4)
    for row in res.concepts:
        assert row.base_share > 0.02
        assert row.ablation_drop == pytest.approx(1.0)       # the concept's only units are gone
        assert row.random_ablation_drop < 0.6                 # 3 of 12 random units rarely hold all three
        assert row.inserted_new_share > 0.95                  # inserted at k >= threshold everywhere
        assert row.ace > row.random_ace
    assert load_result(res.save(tmp_path / "i.json")).to_json() == res.to_json()
    # in a region (the top-left 2x2 of the 4x4 map): the concept appears there, except along the region's border
    # where the bilinear upsampling blends the inserted value with the zeros outside (a quarter of its pixels)
    top_left = intervene(planted, d, concepts=[2], num_units=3, num_samples=16, random_draws=1,
                         region=[0, 0, 0.5, 0.5])
    assert top_left.concepts[0].inserted_share > 0.7
    assert top_left.concepts[0].inserted_share > 3 * top_left.concepts[0].base_share


def test_sefa_is_the_top_eigenvectors_of_ata():
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    d, ev = sefa(a, 2)
    assert ev.tolist() == pytest.approx([9.0, 1.0])
    assert d.abs().tolist() == [[1.0, 0.0], [0.0, 1.0]]
    w = torch.randn(20, 6)
    d, ev = sefa(w, 6)
    assert torch.allclose(d @ d.T, torch.eye(6), atol=1e-5)
    assert ev.tolist() == pytest.approx((torch.linalg.svdvals(w) ** 2).tolist(), rel=1e-4)


def test_traversal_measures_shares(planted, tmp_path):
    dirs, ev = directions_of(planted, ["sefa", "random", "axes"], k=3)
    res = traverse(planted, dirs, num_samples=8, eigenvalues=ev)
    assert res.shares["sefa"].shape == (3, 5, 4)
    # at alpha 0 every family sees the same images
    assert torch.allclose(res.shares["sefa"][:, 2], res.shares["random"][:, 2])
    assert (res.change("sefa")[:, 0] == 0).all()
    back = load_result(res.save(tmp_path / "t.json"))
    assert isinstance(back, LatentDirectionsResult) and torch.equal(back.shares["axes"], res.shares["axes"])
    with pytest.raises(ConfigError, match="unknown"):
        directions_of(planted, ["pca"], 3)


def test_hessian_penalty_by_hand():
    z = torch.randn(4, 2)
    separable = hessian_penalty(lambda z: (z ** 2).sum(1, keepdim=True) + 3 * z[:, :1], z, k=4)
    assert float(separable) == pytest.approx(0.0, abs=1e-6)
    # G = z1 z2: v^T H v = 2 v1 v2 = +-2, each with probability 1/2 -> expected variance 4
    torch.manual_seed(0)
    est = hessian_penalty(lambda z: z[:, :1] * z[:, 1:], z.repeat(500, 1), k=2)
    assert float(est) == pytest.approx(4.0, rel=0.1)


def test_frechet_distance_of_known_gaussians():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    b = torch.randn(20000, 3) * 2 + torch.tensor([1.0, 0.0, 0.0])
    # ||mu||^2 + sum (1 + 4 - 2 * 2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_information_quality_ratio_by_hand():
    # identical masks: I = H(A) = H(A, B) -> 1; independent masks (each 1/2, joint 1/4 each) -> 0
    iqr = information_quality_ratio(torch.tensor([[0.0, 50.0]]), torch.tensor([50.0]), torch.tensor([0.0, 50.0]),
                                    100.0)
    assert float(iqr[0, 1]) == pytest.approx(1.0)
    iqr = information_quality_ratio(torch.tensor([[0.0, 25.0]]), torch.tensor([50.0]), torch.tensor([0.0, 50.0]),
                                    100.0)
    assert float(iqr[0, 1]) == pytest.approx(0.0, abs=1e-12)
    # one quarter overlap of two 1/2 masks... a value by hand: p = (.4, .1, .1, .4)
    iqr = information_quality_ratio(torch.tensor([[0.0, 40.0]]), torch.tensor([50.0]), torch.tensor([0.0, 50.0]),
                                    100.0)
    h = -(2 * 0.4 * math.log(0.4) + 2 * 0.1 * math.log(0.1))
    assert float(iqr[0, 1]) == pytest.approx((2 * math.log(2) - h) / h)


def test_bad_input_errors(planted):
    with pytest.raises(CapabilityError, match="GenerativeModel"):
        dissect_generator(nn.Linear(2, 2), "units")
    with pytest.raises(ConfigError, match="not a probe layer.*valid: units"):
        dissect_generator(planted, "conv9", num_samples=4, option="callbacks.gan_dissection.layer")
    with pytest.raises(ConfigError, match="model.segmenter is not set"):
        dissect_generator(PlantedGenerator(segmenter=False), "units", num_samples=4)
    with pytest.raises(ConfigError, match="threshold"):
        dissect_generator(planted, "units", num_samples=4, method="otsu")


def test_label_maps_hold_the_concepts_of_each_pixel():
    from algorithms.gan.dissection import label_maps
    masks = torch.zeros(1, 4, 1, 3, dtype=torch.bool)
    masks[0, 1, 0, 0] = masks[0, 3, 0, 0] = True      # pixel 0: concepts 1 and 3
    masks[0, 2, 0, 1] = True                          # pixel 1: concept 2; pixel 2: none
    maps = label_maps(masks)
    assert maps.shape == (1, 2, 1, 3)
    assert maps[0, :, 0].T.tolist() == [[3, 1], [2, 0], [0, 0]]
