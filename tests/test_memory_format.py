"""`channels_last` (conf/train.yaml): the model train.py and interpret.py build keeps its 4-D weights channels-last,
and computes what the default layout computes, to float rounding, for every built-in model's scores and gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.training import apply_memory_format, build_model_and_data
from tests.conftest import compose_config


def four_d(model):
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("value", [True, False])
def test_the_built_model_has_the_configured_layout(value, tmp_path):
    cfg = compose_config(["model=cnn", f"channels_last={str(value).lower()}"], tmp_path)
    _, model, _ = build_model_and_data(cfg, tmp_path)
    weights = four_d(model)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) == value for w in weights)


@pytest.mark.parametrize("model", ["cnn", "protopnet", "dynconn", "icnn", "capsnet", "segmenter", "gan"])
def test_channels_last_computes_the_default_layouts_values(model, tmp_path):
    import hydra
    torch.manual_seed(0)
    cfg = compose_config([f"model={model}"], tmp_path)
    dm = hydra.utils.instantiate(cfg.datamodule)
    from pipeline.training import fill_data_shape
    fill_data_shape(cfg, dm)
    plain = hydra.utils.instantiate(cfg.model).eval()
    nhwc = apply_memory_format(copy.deepcopy(plain), True)
    assert any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in four_d(nhwc))
    size = int(cfg.datamodule.image_size)
    x = torch.rand(4, int(cfg.datamodule.channels or 3), size, size)
    if model == "gan":
        x = torch.randn(4, plain.latent_dim)
        outs = [m.generate(x) for m in (plain, nhwc)]
    elif model == "segmenter":
        outs = [m.concept_probabilities(x) for m in (plain, nhwc)]
    else:
        outs = [m.class_scores(x) for m in (plain, nhwc)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    grads = []
    for m, out in zip((plain, nhwc), outs):
        out.float().square().sum().backward()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
