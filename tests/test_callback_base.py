"""The frame shared by every interpretation callback: scheduling, the training state it must leave untouched
(random streams, train/eval flags, gradients), failures raised clearly, W&B image grouping."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.base import (InterpretationCallback, InterpretationError, interpretation_mode, interpretation_record,
                            overhead_line, preserved_rng)


class NoisyCallback(InterpretationCallback):
    """Draws from every random stream, like featviz's random init or a sampled probe set."""
    name = "noisy"

    def run(self, trainer, module, epoch):
        torch.randn(100)
        random.random()
        np.random.rand(3)
        return {"value": 1.5}


class FailingCallback(InterpretationCallback):
    name = "failing"

    def run(self, trainer, module, epoch):
        raise KeyError("no such layer")


class Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.logged = {}

    @property
    def device(self):
        return torch.device("cpu")

    def log(self, key, value, **kwargs):
        self.logged[key] = value


def trainer(epoch=0, max_epochs=10):
    return SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, sanity_checking=False, default_root_dir=".",
                           loggers=[])


def draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_interpretation_leaves_the_random_streams_of_training_unchanged():
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    module = Module()  # consumes torch draws: re-seed after it
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    metrics = NoisyCallback().execute(trainer(), module)
    assert draws() == expected
    assert metrics == {"interp/noisy/value": 1.5}
    # the method's metrics and the run's cost, interp/<name>/seconds
    assert module.logged.keys() == {"interp/noisy/value", "interp/noisy/seconds"}
    assert module.logged["interp/noisy/value"] == 1.5 and module.logged["interp/noisy/seconds"] >= 0


def test_preserved_rng_restores_after_an_error():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError):
        with preserved_rng(torch.device("cpu")):
            torch.rand(50)
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(2), expected)


def test_interpretation_mode_restores_modes_flags_and_grads():
    module = Module().train()
    module.lin.bias.requires_grad_(False)
    module.lin.weight.grad = torch.ones(2, 2)
    with torch.inference_mode():
        with interpretation_mode(module):
            assert not module.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            module.lin(torch.randn(4, 2, requires_grad=True)).sum().backward()
            module.lin.bias.requires_grad_(True)
    assert module.training and not module.lin.bias.requires_grad
    assert torch.equal(module.lin.weight.grad, torch.ones(2, 2))


def test_a_failing_method_raises_naming_the_callback_and_epoch():
    with pytest.raises(InterpretationError, match=r"'failing' failed on rank 0 at epoch 4: KeyError"):
        FailingCallback(on_error="raise").execute(trainer(epoch=4), Module())


@pytest.mark.parametrize("every,epochs_run", [(1, list(range(10))), (3, [2, 5, 8, 9]), (20, [9])])
def test_schedule_every_n_epochs_and_the_last_one(every, epochs_run):
    cb = NoisyCallback(every_n_epochs=every)
    assert [e for e in range(10) if cb.should_run(trainer(epoch=e))] == epochs_run
    with pytest.raises(ValueError, match="callbacks.noisy.every_n_epochs=0"):
        NoisyCallback(every_n_epochs=0)


@pytest.mark.parametrize("every,max_epochs,rendered", [
    (5, 11, [4, 10]),           # not after epoch 10: the last (11) is 1 < 2.5 epochs away
    (5, 8, [4, 7]),             # after epoch 5: the last is 3 >= 2.5 epochs away
    (5, 13, [4, 9, 12]),        # 3 epochs from 10 to 13
    (5, 12, [4, 11]),           # 2 from 10 to 12: skipped
    (1, 4, [0, 1, 2, 3]),
    (20, 6, [5])])
def test_figures_every_nth_epoch_unless_the_last_is_near_and_after_the_last(every, max_epochs, rendered):
    cb = NoisyCallback()
    assert [e for e in range(max_epochs) if cb.render_due(trainer(epoch=e, max_epochs=max_epochs), every)] == rendered
    stopping = SimpleNamespace(current_epoch=2, max_epochs=11, should_stop=True)
    assert cb.render_due(stopping, 5)                      # a fit that stops early still draws its last figures
    unlimited = [e for e in range(7) if cb.render_due(SimpleNamespace(current_epoch=e, max_epochs=-1), 3)]
    assert unlimited == [2, 5]                            # max_epochs -1 (no limit): every 3rd, no "last" epoch
    assert cb.render_due(SimpleNamespace(current_epoch=0, max_epochs=11, state=SimpleNamespace(fn="validate")), 5)


def test_images_of_different_sizes_get_a_wandb_key_each(tmp_path, monkeypatch):
    calls = []
    logger = SimpleNamespace(log_image=lambda key, images, step, **kw: calls.append((key, images, kw)))
    monkeypatch.setattr(InterpretationCallback, "wandb_loggers", staticmethod(lambda trainer: [logger]))
    paths = []
    for name, size in (("a", (8, 8)), ("b", (8, 8)), ("c", (16, 4))):
        Image.new("RGB", size).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    tr = SimpleNamespace(global_step=7)
    NoisyCallback().log_images(tr, "grid", paths[:2], captions=["A", "B"])
    assert calls == [("interp/noisy/grid", [str(paths[0]), str(paths[1])], {"caption": ["A", "B"]})]
    calls.clear()
    NoisyCallback().log_images(tr, "grid", paths, captions=["A", "B", "C"])
    assert [(k, kw["caption"]) for k, _, kw in calls] == [("interp/noisy/grid/a", ["A"]), ("interp/noisy/grid/b", ["B"]),
                                                         ("interp/noisy/grid/c", ["C"])]


def test_overhead_record_and_the_end_of_run_line():
    a, b, off = NoisyCallback(), FailingCallback(), NoisyCallback()
    a.name, b.name, off.name = "dissection", "attribution", "featviz"
    a.seconds, a.runs, b.seconds, b.runs = 6.0, 3, 2.0, 3
    b.seconds_before_fit = 1.0   # a resumed run: 1 s of it belongs to the earlier start
    record = interpretation_record([a, b, off, object()], fit_seconds=107.0)
    assert record["interp_seconds"] == {"dissection": 6.0, "attribution": 2.0} and record["interp_total_seconds"] == 8
    assert record["interp_runs"] == {"dissection": 3, "attribution": 3} and record["interp_errors"] == []
    # this fit: 7 s of callbacks in 107 s -> training 100 s, overhead 0.07
    assert record["training_seconds"] == 100.0 and record["interp/overhead"] == 0.07
    assert overhead_line(record) == ("interpretation took 7.0% of training (dissection 6.0 s, attribution 2.0 s; "
                                     "8.0 s in all, training 100.0 s)")
    assert "interp/overhead" not in interpretation_record([a])
