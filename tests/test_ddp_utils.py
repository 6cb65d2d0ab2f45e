import torch

from core import distributed as D
from tests.ddp_utils import run_ddp


def _gather_and_sum(rank, world_size, n):
    idx = D.shard_indices(n)
    local = torch.tensor(idx, dtype=torch.float32)
    return {"idx": idx, "gathered": D.all_gather_cat(local).tolist(),
            "sum": D.all_reduce_sum(local.sum().reshape(1)).item(), "any": D.any_rank(rank == 1)}


def test_shards_cover_once_and_collectives_agree():
    n = 7
    results = run_ddp(_gather_and_sum, 2, args=(n,))
    assert results[0]["idx"] + results[1]["idx"] == list(range(n))
    for r in results:
        assert r["gathered"] == list(range(n))  # uneven shards (4 + 3) gathered in rank order, no padding left
        assert r["sum"] == sum(range(n))
        assert r["any"] is True


def test_single_process_is_identity():
    assert D.shard_indices(5) == list(range(5))
    t = torch.arange(3.0)
    assert torch.equal(D.all_gather_cat(t), t) and D.any_rank(False) is False
