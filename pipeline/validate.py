"""Check every numeric and choice setting of the trainer, the model and the data before anything heavy runs.

Each problem is reported with its key, its value, the valid range and the fix (`trainer.max_epochs='abc': must be
an integer >= 1 ...`), instead of a bare AssertionError, a silent truncation (`model.k=2.7` training with K=2) or a
traceback from deep inside Lightning or torch minutes later. The settings of the interpretation callbacks are checked
by the callbacks themselves (callbacks/base.py) when training starts.

Rules are keyed by config paths; `*` matches one key. A setting that is absent is not checked (each model and data
module has its own keys).
"""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from core.errors import ConfigError


class Problem(Exception):
    """One bad value; the text after `key=value: `."""


# ----- value checks ---------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, null: bool = False, also: tuple = ()) -> Callable:
    def check(v):
        if v is None and null:
            return
        if v in also and not isinstance(v, bool):
            return
        rng = (f">= {lo}" if hi is None else f"in [{lo}, {hi}]") if lo is not None else "an integer"
        extra = "".join(f" or {a}" for a in also) + (" or null" if null else "")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v):
            kind = "a fraction" if isinstance(v, float) else type(v).__name__ if v is not None else "null"
            raise Problem(f"must be an integer {rng}{extra}, not {kind} (no rounding is done)")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise Problem(f"must be an integer {rng}{extra}")
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           null: bool = False) -> Callable:
    def check(v):
        if v is None and null:
            return
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        if lo is not None and hi is not None:
            rng = f"a finite number in {left}{lo}, {hi}{right}"
        elif lo is not None:
            rng = f"a finite number {'>' if lo_open else '>='} {lo}"
        else:
            rng = "a finite number"
        rng += " or null" if null else ""
        if not _is_num(v) or not math.isfinite(float(v)):
            raise Problem(f"must be {rng}")
        v = float(v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise Problem(f"must be {rng}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise Problem(f"must be {rng}")
    return check


def boolean(null: bool = False) -> Callable:
    def check(v):
        if v is None and null:
            return
        if not isinstance(v, bool):
            raise Problem("must be true or false" + (" or null" if null else ""))
    return check


def choice(*options, null: bool = False) -> Callable:
    def check(v):
        if v is None and null:
            return
        if v not in options:
            raise Problem(f"choose one of {', '.join(map(str, options))}" + (" or null" if null else ""))
    return check


def fraction_or_count(v) -> None:
    """limit_*_batches: a fraction of the batches in [0, 1] or a number of batches."""
    if v is None or _is_int(v) and v >= 0:
        return
    if isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0:
        return
    raise Problem("must be a fraction in [0.0, 1.0] or a number of batches >= 0")


def devices(v) -> None:
    if v == "auto" or (_is_int(v) and (v >= 1 or v == -1)):
        return
    if isinstance(v, str) and (v.strip() == "-1" or v.replace(",", "").strip().isdigit()):
        return
    if isinstance(v, (list, tuple, ListConfig)) and v and all(_is_int(d) and d >= 0 for d in v):
        return
    raise Problem("must be an integer >= 1, -1 (all), 'auto' or a list of device indices")


def existing_file(v) -> None:
    if v is None:
        return
    p = Path(str(v)).expanduser()
    if p.is_dir():
        raise Problem(f"is a folder; pass the checkpoint file ({p / 'last.ckpt'}) or resume=<run folder>")
    if not p.is_file():
        raise Problem("does not exist; pass <run folder>/checkpoints/last.ckpt, or resume=<run folder>")


def not_a_file(v) -> None:
    """A folder setting pointing at an existing file (mkdir would say only 'File exists')."""
    if v is None:
        return
    p = Path(str(v)).expanduser()
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                raise Problem(f"{'is' if parent == p else f'lies below {parent}, which is'} a file, not a folder; "
                              f"move the file away or choose another folder")
            return


FINITE = number()
POSITIVE = number(0, lo_open=True)
NONNEGATIVE = number(0)
UNIT = number(0, 1)
LR = number(0, lo_open=True)

PRECISIONS = ("64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
              "transformer-engine", "transformer-engine-float16", 64, 32, 16)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

RULES: list[tuple[str, Callable]] = [
    # trainer (max_epochs: see check_max_epochs)
    ("trainer.min_epochs", integer(0, null=True)),
    ("trainer.max_steps", integer(-1)),
    ("trainer.check_val_every_n_epoch", integer(1, null=True)),
    ("trainer.log_every_n_steps", integer(1)),
    ("trainer.num_sanity_val_steps", integer(-1)),
    ("trainer.accumulate_grad_batches", integer(1)),
    ("trainer.num_nodes", integer(1)),
    ("trainer.gradient_clip_val", number(0, null=True)),
    ("trainer.limit_train_batches", fraction_or_count),
    ("trainer.limit_val_batches", fraction_or_count),
    ("trainer.limit_test_batches", fraction_or_count),
    ("trainer.devices", devices),
    ("trainer.precision", choice(*PRECISIONS, null=True)),
    ("trainer.accelerator", choice(*ACCELERATORS)),
    ("trainer.deterministic", choice(True, False, "warn")),
    # data
    ("datamodule.*batch_size", integer(1)),
    ("datamodule.num_workers", integer(0)),
    ("datamodule.image_size", integer(1, null=True)),
    ("datamodule.mask_size", integer(1, null=True)),
    ("datamodule.channels", choice(1, 3, null=True)),
    ("datamodule.num_classes", integer(2, null=True)),
    ("datamodule.val_fraction", number(0, 1, hi_open=True)),
    ("datamodule.test_fraction", number(0, 1, hi_open=True)),
    ("datamodule.shift", integer(0)),
    ("datamodule.seed", integer()),
    ("datamodule.n_train", integer(1)),
    ("datamodule.n_val", integer(1)),
    ("datamodule.n_test", integer(1)),
    ("datamodule.distractor_prob", UNIT),
    ("datamodule.probe_size", integer(1, null=True)),
    ("datamodule.workers", integer(1, null=True)),
    ("datamodule.normalize", boolean()),
    ("datamodule.augment", boolean()),
    ("datamodule.hflip", boolean()),
    ("datamodule.download", boolean()),
    ("datamodule.pin_memory", boolean()),
    ("datamodule.crop", boolean()),
    ("datamodule.verify_checksums", boolean()),
    # model: learning rates of every optimiser and phase, weight decays, sizes, probabilities
    ("model.optimizer.lr", LR),
    ("model.*.lr", LR),
    ("model.phase_lrs.*.*", LR),
    ("model.optimizer.weight_decay", NONNEGATIVE),
    ("model.weight_decay", NONNEGATIVE),
    ("model.weight_decay.*", NONNEGATIVE),
    ("model.head_weight_decay", number(0, null=True)),
    ("model.optimizer.momentum", number(0, 1, hi_open=True)),
    ("model.num_classes", integer(2)),
    ("model.channels", integer(1)),
    ("model.image_size", integer(1)),
    ("model.k", integer(1, null=True)),
    ("model.dropout", number(0, 1, hi_open=True)),
    ("model.prototypes_per_class", integer(1)),
    ("model.prototype_dim", integer(1)),
    ("model.push_batch_size", integer(1)),
    ("model.schedule.warm_epochs", integer(0)),
    ("model.schedule.push_start", integer(0)),
    ("model.schedule.push_every", integer(1)),
    ("model.schedule.last_layer_epochs", integer(0)),
    ("model.schedule.final_push", boolean()),
    ("model.schedule.push", boolean()),
    ("model.coefs.*", FINITE),
    ("model.prune.k", integer(1)),
    ("model.prune.min_own_class", integer(0)),
    ("model.prune.enabled", boolean()),
    ("model.freeze_batchnorm", boolean()),
    ("model.*scheduler.gamma", number(0, lo_open=True)),
    ("model.*scheduler.step_size", integer(1)),
    ("model.*scheduler.T_max", integer(1)),
    ("model.filters", integer(1)),
    ("model.num_layers", integer(1)),
    ("model.beta", POSITIVE),
    ("model.loss_weight", NONNEGATIVE),
    ("model.z_momentum", UNIT),
    ("model.assign_momentum", UNIT),
    ("model.conv_channels", integer(1)),
    ("model.kernel_size", integer(1)),
    ("model.primary_types", integer(1, null=True)),
    ("model.primary_dim", integer(1)),
    ("model.primary_stride", integer(1)),
    ("model.class_dim", integer(1)),
    ("model.routing_iterations", integer(1)),
    ("model.reconstruction_weight", NONNEGATIVE),
    ("model.m_plus", UNIT),
    ("model.m_minus", UNIT),
    ("model.down_weight", NONNEGATIVE),
    ("model.shift_pixels", integer(0)),
    ("model.interpretable", boolean()),
    ("model.reconstruction", boolean()),
    ("model.detach_votes", boolean()),
    # the best checkpoint (conf/callbacks/minimal.yaml)
    ("callbacks.model_checkpoint.mode", choice("min", "max")),
    ("callbacks.model_checkpoint.save_top_k", integer(-1)),
    # the run
    ("seed", integer(null=True)),
    ("test", boolean()),
    ("channels_last", boolean()),
    ("ckpt_path", existing_file),
]


# ----- walking the config ---------------------------------------------------------------------------------------------
def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf and every inner node, `???` reported as MISSING. Interpolations
    (`model.num_classes: ${datamodule.num_classes}`) are skipped: their source is checked under its own name, once."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            if OmegaConf.is_missing(node, key):
                yield path, MISSING
                continue
            if OmegaConf.is_interpolation(node, key):
                continue
            value = node[key]
            yield path, value
            if isinstance(value, DictConfig):
                yield from _leaves(value, path)


class _Missing:
    def __repr__(self):
        return "???"


MISSING = _Missing()


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    if value is None:
        return "null"
    return str(value)


def collect_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for path, value in _leaves(cfg):
        if isinstance(value, DictConfig) and not any(fnmatch.fnmatchcase(path, p) for p, _ in RULES):
            continue
        for pattern, check in RULES:
            if path in seen or not fnmatch.fnmatchcase(path, pattern):
                continue
            if value is MISSING:
                problems.append(f"{path} is not set (???); set {path}=<value> on the command line")
                seen.add(path)
                break
            if isinstance(value, DictConfig):  # e.g. model.weight_decay as a per-group mapping: its keys are checked
                break
            try:
                check(value)
            except Problem as why:
                problems.append(f"{path}={_show(value)}: {why}")
            seen.add(path)
            break
        else:
            # any other number of the model and the data: NaN and inf never make sense there
            if (path.startswith(("model.", "datamodule.")) and isinstance(value, float)
                    and not math.isfinite(value) and path not in seen):
                problems.append(f"{path}={_show(value)}: must be a finite number")
    problems += check_max_epochs(cfg)
    problems += check_fractions(cfg)
    problems += check_folders(cfg)
    return problems


def has_stopping_rule(cfg: DictConfig) -> bool:
    """Something that ends an open-ended run: early stopping, max_steps or max_time."""
    trainer = cfg.get("trainer") or {}
    if _is_int(trainer.get("max_steps")) and trainer.get("max_steps") > 0:
        return True
    if trainer.get("max_time"):
        return True
    for conf in (cfg.get("callbacks") or {}).values():
        if isinstance(conf, DictConfig) and "EarlyStopping" in str(conf.get("_target_", "")):
            return True
    return False


def check_max_epochs(cfg: DictConfig) -> list[str]:
    trainer = cfg.get("trainer")
    if trainer is None or "max_epochs" not in trainer:
        return []
    if OmegaConf.is_missing(trainer, "max_epochs"):
        return ["trainer.max_epochs is not set (???); set trainer.max_epochs=<epochs>"]
    v = trainer.max_epochs
    if v == -1 and not isinstance(v, bool):
        if has_stopping_rule(cfg):
            return []
        return ["trainer.max_epochs=-1 would train forever: no stopping rule is configured. Set a number of epochs "
                "(>= 1), or add a stopping rule: trainer.max_steps=<steps>, trainer.max_time=DD:HH:MM:SS, or an "
                "early-stopping callback (+callbacks.early_stopping._target_=pytorch_lightning.callbacks.EarlyStopping "
                "+callbacks.early_stopping.monitor=val/loss)"]
    try:
        integer(1)(v)
    except Problem as why:
        return [f"trainer.max_epochs={_show(v)}: {why} (-1 = until a stopping rule such as early stopping ends it)"]
    min_epochs = trainer.get("min_epochs")
    if _is_int(min_epochs) and min_epochs > v:
        return [f"trainer.min_epochs={min_epochs} is larger than trainer.max_epochs={v}; lower it or raise "
                f"trainer.max_epochs"]
    return []


def check_fractions(cfg: DictConfig) -> list[str]:
    dm = cfg.get("datamodule") or {}
    val, test = dm.get("val_fraction"), dm.get("test_fraction")
    if _is_num(val) and _is_num(test) and 0 <= val < 1 and 0 <= test < 1 and val + test >= 1:
        return [f"datamodule.val_fraction={val} + datamodule.test_fraction={test} >= 1 leaves no training images; "
                f"lower them"]
    return []


def check_folders(cfg: DictConfig) -> list[str]:
    """Folders that are files (resolved: these settings are usually interpolations of paths.*)."""
    problems = []
    for key in ("datamodule.data_dir", "paths.output_dir"):
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
            not_a_file(value)
        except Problem as why:
            problems.append(f"{key}={_show(str(value))}: {why}")
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every bad setting (key, value, valid range, fix)."""
    try:
        problems = collect_problems(cfg)
    except Exception as err:  # an interpolation that cannot resolve, e.g. ${datamodule.num_classes} of a bad value
        raise ConfigError(f"the configuration cannot be resolved: {err}") from err
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} settings are invalid:\n  - " + "\n  - ".join(problems))
