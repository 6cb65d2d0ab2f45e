"""The GAN methods under 2-process gloo DDP equal the single-process run on the planted generator
(tests/gan_planted.py): dissection (both threshold rules: thresholds to 1e-6, counts exactly, the same top samples),
interventions and latent traversals; each rank generated only its contiguous share of the probe latents (an odd
count, and one sample, where rank 1's share is empty); a failure on one rank stops both together. One 2-process
launch runs every check (spawning costs more than the checks)."""
from __future__ import annotations

import pytest
import torch

from algorithms.gan.directions import directions_of, traverse
from algorithms.gan.dissection import dissect_generator
from algorithms.gan.interventions import intervene
from algorithms.gan.sampling import latents
from core import distributed as D
from tests.ddp_utils import run_ddp
from tests.gan_planted import PlantedGenerator

SIZES = (21, 1)
DRAWS = 2
CONCEPTS = [1, 2, 3]


class CountingGenerator(PlantedGenerator):
    """Records every batch of latents `generate` is called with."""

    def __init__(self, fail_on_rank: int | None = None):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.fail_on_rank = fail_on_rank

    def generate(self, z):
        if self.fail_on_rank == D.rank():
            raise ValueError(f"generator broke on rank {D.rank()}")
        self.seen.append(z.clone())
        return super().generate(z)

    def take(self) -> torch.Tensor:
        out = torch.cat(self.seen) if self.seen else torch.zeros(0, self.latent_dim)
        self.seen = []
        return out


def _dissection_fields(d):
    return {"thresholds": d.thresholds, "intersection": d.intersection, "unit_area": d.unit_area,
            "concept_area": d.concept_area, "top_images": d.top_images, "top_scores": d.top_scores,
            "num_images": d.num_images, "seg_size": d.seg_size, "map_size": d.map_size}


def _run_methods(n: int) -> dict:
    """Every GAN method on n probe latents, with what the generator was asked to generate in each."""
    g = CountingGenerator()
    out = {}
    for method in ("quantile", "iqr"):
        d = dissect_generator(g, "units", num_samples=n, batch_size=4, method=method, num_top=4)
        out[method] = _dissection_fields(d)
        out[f"{method}/z"] = g.take()
    d = dissect_generator(PlantedGenerator(), "units", num_samples=64, batch_size=32)   # the same on every rank
    for name, region in (("all", None), ("region", [0, 0, 0.5, 0.5])):
        res = intervene(g, d, CONCEPTS, num_units=3, num_samples=n, random_draws=DRAWS, region=region, batch_size=4)
        out[f"intervene/{name}"] = res.to_json()
        out[f"intervene/{name}/z"] = g.take()
    dirs, ev = directions_of(g, ["sefa", "random"], k=2)
    res = traverse(g, dirs, num_samples=n, batch_size=4, eigenvalues=ev)
    out["traverse"] = {"shares": res.shares, "classes": res.classes}
    out["traverse/z"] = g.take()
    return out


def _failure() -> str:
    try:
        dissect_generator(CountingGenerator(fail_on_rank=1), "units", num_samples=8)
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank saw
        return f"{type(err).__name__}: {err}"
    return "no error"


def _gan_ddp(rank, world_size):
    return {"methods": {n: _run_methods(n) for n in SIZES}, "failure": _failure(), "rank": rank}


@pytest.fixture(scope="module")
def ddp_results():
    return run_ddp(_gan_ddp, 2, timeout_s=120)


@pytest.fixture(scope="module")
def single():
    return {n: _run_methods(n) for n in SIZES}


def _same_dissection(got, want):
    assert torch.allclose(got["thresholds"], want["thresholds"], atol=1e-6, rtol=0)
    for key in ("intersection", "unit_area", "concept_area", "top_scores"):
        assert torch.equal(got[key], want[key]), key
    # the same samples where the score is positive (zero peaks tie, and ties may be taken in another order)
    on = want["top_scores"] > 0
    assert torch.equal(got["top_images"][on], want["top_images"][on])
    assert (got["num_images"], got["seg_size"], got["map_size"]) == (want["num_images"], want["seg_size"],
                                                                      want["map_size"])


def _same_intervention(got, want):
    assert [r["units"] for r in got["concepts"]] == [r["units"] for r in want["concepts"]]
    for g_row, w_row in zip(got["concepts"], want["concepts"]):
        for key, value in w_row.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert g_row[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.ddp
@pytest.mark.parametrize("n", SIZES)
def test_gan_methods_under_ddp_equal_single_process(n, ddp_results, single):
    want = single[n]
    assert want["quantile"]["intersection"].sum() > 0 or n == 1
    for out in ddp_results:
        got = out["methods"][n]
        for method in ("quantile", "iqr"):
            _same_dissection(got[method], want[method])
        for name in ("all", "region"):
            _same_intervention(got[f"intervene/{name}"], want[f"intervene/{name}"])
        for key in ("shares", "classes"):
            for fam, value in want["traverse"][key].items():
                assert torch.allclose(got["traverse"][key][fam], value, atol=1e-6, rtol=0), (key, fam)
    # every rank returns the identical result (from the same reduced sums)
    a, b = (r["methods"][n] for r in ddp_results)
    assert torch.equal(a["iqr"]["thresholds"], b["iqr"]["thresholds"])
    assert a["intervene/all"] == b["intervene/all"]
    assert torch.equal(a["traverse"]["shares"]["sefa"], b["traverse"]["shares"]["sefa"])


@pytest.mark.ddp
@pytest.mark.parametrize("n", SIZES)
def test_each_rank_generates_only_its_share(n, ddp_results, single):
    z = latents(PlantedGenerator(), n, 0)
    assert torch.equal(single[n]["quantile/z"], z)                       # single process: all n
    per = (n + 1) // 2
    shares = [(0, min(per, n)), (min(per, n), n)]                          # rank 0 first half, rank 1 the rest
    for out in ddp_results:
        lo, hi = shares[out["rank"]]
        got = out["methods"][n]
        for method in ("quantile", "iqr"):
            assert torch.equal(got[f"{method}/z"], z[lo:hi])              # exactly its slice of the global latents
        # interventions: the unedited samples, then ablation + insertion for the top units and each random draw
        runs = 1 + 2 * len(CONCEPTS) * (1 + DRAWS)
        assert len(got["intervene/all/z"]) == runs * (hi - lo)
        assert torch.equal(got["intervene/all/z"][: hi - lo], latents(PlantedGenerator(), n, 1)[lo:hi])
        # traversals: 2 families x 2 directions x 5 alphas per latent
        assert len(got["traverse/z"]) == 2 * 2 * 5 * (hi - lo)


@pytest.mark.ddp
def test_failure_on_one_rank_stops_both(ddp_results):
    by_rank = {r["rank"]: r["failure"] for r in ddp_results}
    assert by_rank[1] == "ValueError: generator broke on rank 1"
    assert by_rank[0].startswith("PeerFailure")
