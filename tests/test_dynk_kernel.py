"""The compiled CPU kernel of the Dynamic-K head (models/csrc/dynamic_k.c): exact top-K against forming every vote,
gradients against autograd on the dense masked votes, agreement with the torch path, determinism across thread
counts, and the fallbacks (negative or non-finite features, NaN weights, no compiler)."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from models import dynk_kernel
from models.dynconn import DynamicKLinear

HAS_COMPILER = bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture
def kernel():
    lib = dynk_kernel.load()
    if lib is None:
        assert not HAS_COMPILER, "a C compiler is installed but the Dynamic-K kernel did not build (see the log)"
        pytest.skip("no C compiler: the Dynamic-K head runs its torch selection")
    return lib


def brute_force(x, w, k):
    """The K largest votes per (sample, class), from all B x C x D votes."""
    return (x[:, None, :] * w).topk(k, dim=-1).values


def dense_reference_grads(x, w, index, grad):
    """Autograd through z = sum over the selected votes, written as a dense mask over all connections."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    mask = torch.zeros(x.shape[0], w.shape[0], x.shape[1]).scatter_(2, index.long(), 1.0)
    ((x[:, None, :] * w * mask).sum(-1)).backward(grad)
    return x.grad, w.grad


CASES = {
    # name: (B, D, C, K, features, weights)
    "paper setting": (64, 512, 365, 5, "relu", "kaiming"),
    "K = 1, C not a multiple of 8": (9, 70, 5, 1, "relu", "normal"),
    "large K": (16, 300, 12, 30, "relu", "normal"),
    "K = 64, D = K": (4, 64, 10, 64, "relu", "normal"),
    "tied features": (32, 100, 20, 7, "quantised", "quantised"),
    "no positive weights": (16, 128, 9, 5, "relu", "negative"),
    "zeros and -0.0": (16, 128, 13, 6, "signed zeros", "normal"),
    "constant features": (4, 256, 17, 5, "ones", "normal"),
    "one sample, one unit": (1, 1, 3, 1, "relu", "normal"),
}


def make_case(B, D, C, K, features, weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(B, D, generator=g))
    if features == "quantised":
        x = (x * 2).round() / 2
    elif features == "signed zeros":
        x[0] = 0.0
        x[:, : D // 2] = torch.where(x[:, : D // 2] > 0, x[:, : D // 2], torch.tensor(-0.0))
    elif features == "ones":
        x = torch.ones(B, D)
    if weights == "kaiming":
        w = torch.empty(C, D).uniform_(-D ** -0.5, D ** -0.5, generator=g)
    else:
        w = torch.randn(C, D, generator=g)
        if weights == "quantised":
            w = (w * 2).round() / 2
        elif weights == "negative":
            w = -w.abs()
    return x, w, torch.randn(C, generator=g), torch.randn(B, C, generator=g), K


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_selects_the_exact_top_k_and_its_gradients(kernel, name):
    x, w, b, grad, k = make_case(*CASES[name])
    out, index = dynk_kernel.forward(x, w, b, k)
    assert index.shape == (x.shape[0], w.shape[0], k) and index.dtype == torch.int16
    # the chosen units are distinct and carry exactly the K largest votes (ties may pick either unit)
    chosen = (x[:, None, :] * w).gather(2, index.long())
    assert torch.equal(chosen.sort(-1).values, brute_force(x, w, k).sort(-1).values)
    assert bool((index.long().sort(-1).values.diff(dim=-1) > 0).all())
    torch.testing.assert_close(out, brute_force(x, w, k).sum(-1) + b, rtol=1e-5, atol=1e-5)
    gx, gw = dynk_kernel.backward(grad, x, w, index, True, True)
    rx, rw = dense_reference_grads(x, w, index, grad)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_layer_gives_the_same_result_with_and_without_the_kernel(kernel, monkeypatch):
    torch.manual_seed(1)
    layer = DynamicKLinear(256, 37, 5)
    x = torch.relu(torch.randn(48, 256))
    g = torch.randn(48, 37)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(dynk_kernel.ENV_SWITCH, switch)
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        z = layer(xi)
        z.backward(g)
        results.append((z.detach(), layer.select(x).sort(-1).values, xi.grad, layer.weight.grad.clone(),
                        layer.bias.grad.clone()))
    (z1, s1, gx1, gw1, gb1), (z0, s0, gx0, gw0, gb0) = results
    assert torch.equal(s1, s0)
    torch.testing.assert_close(z1, z0)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gw1, gw0)
    torch.testing.assert_close(gb1, gb0)


def test_kernel_results_do_not_depend_on_the_thread_count(kernel):
    x, w, b, grad, k = make_case(*CASES["paper setting"])
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, index = dynk_kernel.forward(x, w, b, k)
            runs.append((out, index, *dynk_kernel.backward(grad, x, w, index, True, True)))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


def test_negative_or_non_finite_features_and_nan_weights_use_the_torch_path(kernel):
    torch.manual_seed(2)
    layer = DynamicKLinear(96, 7, 3)
    x = torch.relu(torch.randn(5, 96))
    for bad in (-1e-3, float("nan"), float("inf")):
        xb = x.clone()
        xb[2, 11] = bad
        assert dynk_kernel.forward(xb, layer.weight, layer.bias, 3) is None
    xb = x - 0.3  # negative features: the layer still returns the sum of the K largest votes
    torch.testing.assert_close(layer(xb), brute_force(xb, layer.weight.detach(), 3).sum(-1) + layer.bias)
    w = layer.weight.detach().clone()
    w[4, 0] = float("nan")
    assert dynk_kernel.forward(x, w, layer.bias, 3) is None


def test_no_compiler_warns_once_and_the_layer_still_works(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(dynk_kernel.ENV_CACHE, str(tmp_path / "cache"))
    dynk_kernel.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="models.dynk_kernel"):
            assert dynk_kernel.load() is None
            assert dynk_kernel.load() is None
        warnings = [r for r in caplog.records if "pure-torch selection" in r.getMessage()]
        assert len(warnings) == 1 and dynk_kernel.ENV_CACHE in warnings[0].getMessage()
        torch.manual_seed(3)
        layer = DynamicKLinear(80, 6, 4)
        x = torch.relu(torch.randn(3, 80))
        torch.testing.assert_close(layer(x), brute_force(x, layer.weight.detach(), 4).sum(-1) + layer.bias)
    finally:
        monkeypatch.undo()
        dynk_kernel.load.cache_clear()


@pytest.mark.skipif(not HAS_COMPILER, reason="needs a C compiler")
def test_compiled_library_is_cached_and_reused(monkeypatch, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = dynk_kernel.SOURCE.read_bytes()
    first = dynk_kernel._compile(compiler, source, tmp_path)
    assert first is not None and first.exists() and first.parent == tmp_path

    def no_compiling(*args, **kwargs):
        raise AssertionError("recompiled although the library is cached")

    monkeypatch.setattr(dynk_kernel.subprocess, "run", no_compiling)
    assert dynk_kernel._compile(compiler, source, tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


def _ddp_head_step(rank: int, world_size: int, state: dict, x: torch.Tensor, grad: torch.Tensor):
    """One forward/backward of the head inside DistributedDataParallel on this rank's half of the batch."""
    from torch.nn.parallel import DistributedDataParallel
    layer = DynamicKLinear(x.shape[1], grad.shape[1], 5)
    layer.load_state_dict(state)
    model = DistributedDataParallel(layer)
    shard = slice(rank * x.shape[0] // world_size, (rank + 1) * x.shape[0] // world_size)
    # DDP averages gradients over ranks: scale the upstream gradient so that the average is the full-batch sum
    model(x[shard]).backward(grad[shard] * world_size)
    return {"weight": layer.weight.grad, "bias": layer.bias.grad, "kernel": dynk_kernel.load() is not None}


@pytest.mark.ddp
def test_ddp_gradients_equal_single_process(kernel):
    from tests.ddp_utils import run_ddp
    torch.manual_seed(6)
    layer = DynamicKLinear(192, 11, 5)
    x = torch.relu(torch.randn(16, 192))
    grad = torch.randn(16, 11)
    layer(x).backward(grad)
    results = run_ddp(_ddp_head_step, world_size=2, args=(layer.state_dict(), x, grad))
    for r in results:
        assert r["kernel"]
        torch.testing.assert_close(r["weight"], layer.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["bias"], layer.bias.grad, rtol=1e-5, atol=1e-6)
