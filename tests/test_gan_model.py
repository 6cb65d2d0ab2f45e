"""model=segmenter and model=gan through train.py on a small shapes set: the two-step recipe runs, the quality
metrics and every GAN callback's typed results land in the run folder, the Hessian penalty is trained, and bad
settings fail early with the option named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from algorithms.gan.result import InterventionResult, LatentDirectionsResult
from algorithms.dissection_result import DissectionResult
from core.errors import ConfigError
from core.protocol import ConceptSegmenter, GenerativeModel, Interpretable
from core.results import load_result
from models.gan import GAN

SMALL = ["datamodule.n_train=480", "datamodule.n_val=120", "datamodule.n_test=120", "logger=none"]


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory):
    from tests.conftest import train_run
    out = tmp_path_factory.mktemp("segmenter")
    metrics = train_run([*SMALL, "model=segmenter", "callbacks=minimal", "trainer.max_epochs=1", "test=false"], out)
    return out, metrics


@pytest.fixture(scope="module")
def gan_run(segmenter_run, tmp_path_factory):
    from tests.conftest import train_run
    out = tmp_path_factory.mktemp("gan")
    ckpt = segmenter_run[0] / "checkpoints" / "last.ckpt"
    metrics = train_run([*SMALL, "model=gan", f"model.segmenter={ckpt}", "model.hessian_penalty=0.1",
                         "model.ema_decay=0.9", "model.hessian_batch=4", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                         "datamodule.batch_size=16",
                         "callbacks.gan_dissection.num_samples=32", "callbacks.gan_intervention.num_samples=8",
                         "callbacks.gan_intervention.random_draws=1", "callbacks.gan_intervention.concepts=[circle]",
                         "callbacks.gan_directions.num_samples=2", "callbacks.gan_directions.num_directions=2"], out)
    return out, metrics


def test_segmenter_logs_pixel_metrics(segmenter_run):
    _, metrics = segmenter_run
    for key in ("val/miou", "val/pixel_acc", "val/acc", "val/iou/circle"):
        assert key in metrics
    assert 0.0 <= metrics["val/miou"] <= 1.0
    assert metrics["val/pixel_acc"] > 0.5


def test_gan_run_writes_quality_and_typed_results(gan_run):
    out, metrics = gan_run
    run = json.loads((out / "metrics.json").read_text())
    assert run["status"] == "completed" and not run["interp_errors"], run.get("interp_errors")
    assert metrics["val/fd"] > 0 and 0 <= metrics["val/concept_freq_l1"] <= 1
    assert metrics["val/fd_raw"] > 0 and metrics["val/fd_raw"] != metrics["val/fd"]   # the EMA and the trained G
    assert "train/hessian_penalty" in metrics
    for key in ("interp/gan_dissection/interpretable_units", "interp/gan_intervention/ablation_drop",
                "interp/gan_directions/sefa/max_concept_change", "interp/gan_directions/random/concepts_changed"):
        assert key in metrics, key
    base = out / "interp"
    assert isinstance(load_result(base / "gan_dissection/epoch_000/gan_dissection.json"), DissectionResult)
    assert isinstance(load_result(base / "gan_intervention/epoch_000/gan_intervention.json"), InterventionResult)
    assert isinstance(load_result(base / "gan_directions/epoch_000/gan_directions.json"), LatentDirectionsResult)
    for png in ("gan_dissection/epoch_000/top_units.png", "gan_intervention/epoch_000/interventions.png",
                "gan_directions/epoch_000/traversal_sefa.png"):
        assert (base / png).stat().st_size > 1000


def test_capabilities(segmenter_run):
    gan = GAN(segmenter=str(segmenter_run[0] / "checkpoints" / "last.ckpt"))
    assert isinstance(gan, GenerativeModel) and not isinstance(gan, Interpretable)
    assert isinstance(gan.concept_segmenter, ConceptSegmenter)
    assert gan.concept_segmenter.concept_names[1] == "circle"
    # the segmenter is not part of the GAN's weights
    assert not any(k.startswith("_segmenter") for k in gan.state_dict())
    # SeFa's affine first step is the stem's Linear: y = A z + b
    a, b = gan.latent_affine()
    assert a.shape == (gan.generator.stem[0].out_features, gan.latent_dim)


def test_bad_settings_fail_early(tmp_path, run_train):
    with pytest.raises(ConfigError, match="no such checkpoint.*model=segmenter"):
        GAN(segmenter=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="model.g_widths"):
        GAN(g_widths=[64, 32])
    with pytest.raises(ConfigError, match="hessian_penalty"):
        GAN(hessian_penalty=-1.0)
    with pytest.raises(Exception, match="normalize=false"):
        run_train([*SMALL, "model=gan", "callbacks=minimal", "datamodule.normalize=true", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=1"])


def test_unknown_layer_fails_before_training(segmenter_run, run_train):
    ckpt = segmenter_run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="callbacks.gan_dissection.layer.*block9.*valid: stem, .*block1"):
        run_train([*SMALL, "model=gan", f"model.segmenter={ckpt}", "callbacks.gan_dissection.layer=block9",
                   "trainer.max_epochs=1", "+trainer.limit_train_batches=1"])


def test_ema_generator_averages_the_trained_weights_and_is_what_the_model_samples():
    torch.manual_seed(0)
    gan = GAN(g_widths=(16, 8, 8, 4), d_widths=(4, 8, 8, 16), latent_dim=8, ema_decay=0.9)
    assert gan.sampler is gan.generator_ema and gan.probe_layers()["stem"] is gan.generator_ema.stem
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())
    old = [p.detach().clone() for p in gan.generator_ema.parameters()]
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.add_(torch.randn_like(p))
    gan.update_ema()
    for o, e, t in zip(old, gan.generator_ema.parameters(), gan.generator.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * t)
    # what the model generates (and checkpoints) is the averaged generator
    z = torch.randn(3, 8)
    gan.eval()
    torch.testing.assert_close(gan.generate(z), gan.generator_ema(z))
    assert any(k.startswith("generator_ema.") for k in gan.state_dict())
    assert GAN(ema_decay=None).sampler is not None and GAN(ema_decay=None).generator_ema is None


def test_ema_recalibration_estimates_its_own_batch_norm_statistics_deterministically():
    """The stem's running mean after recalibration is the mean of its pre-BN activations over the fixed latents
    (8 equal batches: the cumulative average of the batch means is the overall mean), the same every time, and the
    global random stream is untouched."""
    torch.manual_seed(0)
    gan = GAN(g_widths=(16, 8, 8, 4), d_widths=(4, 8, 8, 16), latent_dim=8, ema_decay=0.5,
              ema_recalibration_batches=3).eval()
    state = torch.get_rng_state()
    gan.recalibrate()
    assert torch.equal(torch.get_rng_state(), state)
    first = {k: v.clone() for k, v in gan.generator_ema.state_dict().items() if "running" in k}
    rng = torch.Generator().manual_seed(4321)
    z = torch.cat([torch.randn(64, 8, generator=rng) for _ in range(3)])
    pre = gan.generator_ema.stem[1](gan.generator_ema.stem[0](z))        # Linear + Unflatten: the BN input
    torch.testing.assert_close(gan.generator_ema.stem[2].running_mean, pre.mean(dim=(0, 2, 3)))
    assert gan.generator_ema.stem[2].momentum == 0.1 and not gan.generator_ema.stem[2].training  # restored
    gan.recalibrate()
    for k, v in gan.generator_ema.state_dict().items():
        if "running" in k:
            assert torch.equal(v, first[k]), k


def test_bad_ema_decay_names_the_option():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="model.ema_decay"):
            GAN(ema_decay=bad)


@pytest.mark.ddp
def test_two_process_ddp_gan_run_gives_the_single_process_gan_results(segmenter_run, tmp_path):
    """`python train.py model=gan trainer=ddp_cpu` (2 gloo processes, manual optimisation of D and G, the EMA
    generator): training completes (DDP refused the discriminator step, which never reaches the generator, until
    models/ddp.py told it), and every GAN callback's result of its last epoch equals what one process computes on
    the run's checkpoint (interpret.py): the callbacks shard their latents across ranks and reduce exactly."""
    import os
    import subprocess
    import sys
    from omegaconf import open_dict
    from pipeline.interpreting import interpret
    from tests.conftest import compose_config
    root = Path(__file__).resolve().parents[1]
    ckpt = segmenter_run[0] / "checkpoints" / "last.ckpt"
    settings = [*SMALL, "model=gan", f"model.segmenter={ckpt}", "model.ema_decay=0.9", "datamodule.batch_size=16",
                "callbacks.gan_dissection.num_samples=32", "callbacks.gan_intervention.num_samples=8",
                "callbacks.gan_intervention.random_draws=1", "callbacks.gan_intervention.concepts=[circle]",
                "callbacks.gan_directions.num_samples=3", "callbacks.gan_directions.num_directions=2"]
    settings = [s for s in settings if s != "logger=none"] + ["logger=csv"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(root / "train.py"), "trainer=ddp_cpu", *settings, "trainer.max_epochs=1",
           "+trainer.limit_train_batches=3", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "metrics.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 2 and not run["interp_errors"]
    assert run["metrics"]["val/fd"] > 0 and run["metrics"]["val/fd_raw"] > 0

    single = tmp_path / "single"
    cfg = compose_config([*settings, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"], single,
                         config_name="interpret")
    with open_dict(cfg):
        del cfg["hydra"]
    interpret(cfg)
    for name in ("gan_dissection", "gan_intervention", "gan_directions"):
        got = load_result(next((out / "interp" / name).glob(f"epoch_*/{name}.json")))
        want = load_result(next((single / "interp" / name).glob(f"epoch_*/{name}.json")))
        assert_same(vars(got), vars(want), name)


def assert_same(got, want, where: str) -> None:
    """Equal results up to float rounding: each rank generates its own share of the latents, so a convolution
    sees other batch sizes than in one process (thresholds differ by ~1e-6); integers and labels exactly."""
    if torch.is_tensor(got):
        assert torch.is_tensor(want) and got.shape == want.shape and got.dtype == want.dtype, where
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=where)
        else:
            assert torch.equal(got, want), where
    elif isinstance(got, dict):
        assert isinstance(want, dict) and set(got) == set(want), where
        for k in got:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5, nan_ok=True), where
    elif hasattr(got, "__dict__") and not isinstance(got, type):
        assert_same(vars(got), vars(want), where)
    else:
        assert got == want, where
