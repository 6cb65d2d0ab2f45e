"""The frame every interpretation callback shares. A callback only schedules, shards, reduces, renders and logs; the
method itself is plain code in algorithms/ (no Lightning import).

A subclass sets `name` (output folder and metric namespace `interp/<name>/...`), `config_key` (its key under
`callbacks.` when that differs from `name`) and `requires` (the capabilities of core/protocol.py the model must
offer), and implements:

- `validate(trainer, module, datamodule)`: called in `setup()`, before the first training step, on every rank.
  Raise `ConfigError` naming `self.option("<key>")` and the valid values for a setting that cannot work with this
  model and data (layer names, method names, a missing probe set).
- `run(trainer, module, epoch) -> dict[str, float]`: compute on `D.shard(dataset)`, reduce with core.distributed,
  render/write on rank 0 (`self.is_rank_zero`) into `self.epoch_dir(...)`, and return scalar metrics that are
  identical on every rank. The base logs them as `interp/<name>/<metric>`.

What the base does around `run`: interpretation mode (eval, grads on outside inference mode, flags, parameter
grads and RNG restored: core/probe.py), timing (`interp/<name>/seconds`), and failures. With `on_error: skip` (the
default) a failure on any rank is recorded on every rank (traceback in train.log, `interp_errors` in metrics.json),
the callback is switched off for the rest of the run and training goes on; `on_error: raise` stops the run with an
`InterpretationError` raised on every rank together.

Callbacks that need another callback's result name it in `depends_on` (e.g. composability needs dissection's concept
labels) and fetch it with `self.provider(trainer, "dissection").result(...)`; a provider computes each result at
most once per epoch, whichever callback asks first, so the result never depends on the order of the callback list.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, Subset

from core import distributed as D
from core.errors import ConfigError
from core.io import write_json  # noqa: F401 (re-exported for callbacks and benchmarks)
from core.probe import interpretation_mode, preserved_rng  # noqa: F401 (re-exported)
from core.protocol import Interpretable, describe_missing

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


class InterpretationError(RuntimeError):
    """An interpretation callback failed with on_error=raise; raised on every rank so that none is left waiting in a
    collective."""


class InterpretationCallback(Callback):
    """Runs an interpretation method every `every_n_epochs` training epochs (and after the last one)."""

    name: str = "interp"
    #: the key under `callbacks.` in the config, for messages (None: the same as `name`)
    config_key: str | None = None
    #: capabilities (core/protocol.py) the model must offer for this method to apply
    requires: tuple[type, ...] = (Interpretable,)
    #: names of callbacks whose results this one needs (checked before training)
    depends_on: tuple[str, ...] = ()

    def __init__(self, every_n_epochs: int = 1, run_on_last_epoch: bool = True, enabled: bool = True,
                 batch_size: int = 64, on_error: str = "skip"):
        key = self.config_key or self.name
        _check_int(every_n_epochs, f"callbacks.{key}.every_n_epochs", 1)
        _check_int(batch_size, f"callbacks.{key}.batch_size", 1)
        if on_error not in ON_ERROR:
            raise ConfigError(f"callbacks.{key}.on_error={on_error!r}: use 'skip' (record the error, switch this "
                              f"callback off, finish the run) or 'raise' (stop the run)")
        self.every_n_epochs = int(every_n_epochs)
        self.run_on_last_epoch = bool(run_on_last_epoch)
        self.enabled = bool(enabled)
        self.batch_size = int(batch_size)
        self.on_error = on_error
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.runs = 0
        self.seconds_before_fit = 0.0   # restored from a checkpoint on a resume: not this fit's cost
        self.disabled = False
        self._active: bool | None = None
        self._memo: dict[Any, Any] = {}
        self._memo_epoch: int | None = None

    # ----- settings -------------------------------------------------------------------------------------------
    def option(self, key: str) -> str:
        """`callbacks.<config key>.<key>`, for error messages."""
        return f"callbacks.{self.config_key or self.name}.{key}"

    def applies_to(self, module) -> bool:
        """Whether the model offers every capability in `requires`."""
        return all(isinstance(module, cap) for cap in self.requires)

    def why_not(self, module) -> str:
        missing = next((cap for cap in self.requires if not isinstance(module, cap)), None)
        return describe_missing(module, missing) if missing is not None else ""

    def validate(self, trainer: Trainer, module: LightningModule, datamodule) -> None:
        """Check the settings against the model and the data before training; raise ConfigError naming the key."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._active = self.enabled and self.applies_to(pl_module)
        if not self.enabled:
            return
        if not self._active:
            if D.is_rank_zero():
                log.info("%s: does not apply here (%s)", self.option("")[:-1], self.why_not(pl_module))
            return
        for dep in self.depends_on:
            if self.provider(trainer, dep, required=False) is None:
                raise ConfigError(f"{self.option('')[:-1]} needs callbacks.{dep} (it uses that callback's results); "
                                  f"add it (callbacks=default has it) or remove {self.option('')[:-1]}")
        self.validate(trainer, pl_module, getattr(trainer, "datamodule", None))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning restores callback state (a resume) before on_fit_start
        self.seconds_before_fit = self.seconds

    @property
    def active(self) -> bool:
        return bool(self._active) and not self.disabled

    # ----- scheduling -------------------------------------------------------------------------------------------
    def should_run(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return epoch % self.every_n_epochs == 0 or (self.run_on_last_epoch and is_last_epoch(trainer))

    @staticmethod
    def render_due(trainer: Trainer, every_n_epochs: int) -> bool:
        """Whether this run draws its figures: after the last epoch (or when the fit is stopping), and every
        `every_n_epochs`-th epoch unless the last one is less than half a period away (it would draw nearly the same
        figures: with 5 and 11 epochs, after epochs 5 and 11, not 10). The metrics and typed results are computed
        and written every run; figures are the part a reader needs less often. Outside training (interpret.py runs
        the callbacks once in a validation pass) they are always due."""
        stage = getattr(getattr(trainer, "state", None), "fn", None)
        if stage is not None and stage != "fit":
            return True
        if is_last_epoch(trainer) or getattr(trainer, "should_stop", False) is True:
            return True
        done = trainer.current_epoch + 1
        left = trainer.max_epochs - done if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        return done % every_n_epochs == 0 and (left is None or 2 * left >= every_n_epochs)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.should_run(trainer):
            return
        if self._active is None:  # used without trainer.fit's setup (tests, notebooks)
            self._active = self.enabled and self.applies_to(pl_module)
        if self.active:
            self.execute(trainer, pl_module)

    def execute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Run the method now (also usable outside the schedule), log and remember its scalars. Failures follow
        `on_error` (see the module docstring); every rank takes the same branch."""
        epoch = trainer.current_epoch
        error: BaseException | None = None
        trace = ""
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        with interpretation_mode(pl_module):
            try:
                metrics = self.run(trainer, pl_module, epoch) or {}
            except Exception as err:  # collected, then handled on every rank together
                error, trace = err, traceback.format_exc()
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.runs += 1
        if D.agree_any(error is not None, device=pl_module.device):
            # every rank learns which rank failed first and why, so rank 0's records name the real error
            # (a rank that only stopped because a peer failed, D.PeerFailure, is not the cause)
            local = None if error is None else (isinstance(error, D.PeerFailure), D.rank(),
                                                f"{type(error).__name__}: {error}", trace)
            _, failed_rank, what, first_trace = min(r for r in D.all_gather_object(local) if r is not None)
            message = f"interpretation callback '{self.name}' failed on rank {failed_rank} at epoch {epoch}: {what}"
            if self.on_error == "raise":
                log.error("%s\n%s", message, trace)
                raise InterpretationError(message) from error
            self.errors.append({"callback": self.name, "epoch": int(epoch), "rank": failed_rank,
                                "error": what, "traceback": first_trace})
            self.disabled = True
            if error is not None or D.is_rank_zero():
                log.error("%s\n%sThe callback is switched off for the rest of this run; training goes on "
                          "(%s=raise stops the run instead).", message, first_trace, self.option("on_error"))
            return {}
        self.last_metrics = {f"interp/{self.name}/{k}": float(v) for k, v in metrics.items()}
        self.history.append({"epoch": epoch, **self.last_metrics})
        for key, value in self.last_metrics.items():
            # identical on every rank (reduced by run), so no sync is needed
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)
        # the cost of this run (this rank's wall clock, never synced: a collective for a timing is not worth it)
        pl_module.log(f"interp/{self.name}/seconds", seconds, on_step=False, on_epoch=True, sync_dist=False)
        return self.last_metrics

    def run(self, trainer: Trainer, module: LightningModule, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    # ----- results shared between callbacks ---------------------------------------------------------------------
    def provider(self, trainer: Trainer, name: str, required: bool = True) -> "InterpretationCallback | None":
        """The callback of this run called `name` (e.g. "dissection"), whatever its place in the callback list."""
        for cb in getattr(trainer, "callbacks", None) or []:
            if isinstance(cb, InterpretationCallback) and cb.name == name and cb is not self:
                return cb
        if required:
            raise ConfigError(f"{self.option('')[:-1]} needs callbacks.{name}, which this run does not have")
        return None

    def memo(self, epoch: int, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` at most once per epoch and key (results a provider hands to other callbacks)."""
        if self._memo_epoch != epoch:
            self._memo, self._memo_epoch = {}, epoch
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ----- data -----------------------------------------------------------------------------------------------
    @staticmethod
    def shard(dataset: Dataset) -> Subset:
        """This rank's contiguous part of the probe set (no padding, no repetition)."""
        return D.shard(dataset)

    def loader(self, dataset: Dataset, batch_size: int | None = None, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=False, num_workers=0, **kwargs)

    def datamodule(self, trainer: Trainer):
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            raise ConfigError(f"{self.option('')[:-1]} needs the run's datamodule "
                              f"(trainer.fit(model, datamodule=...))")
        return dm

    # ----- outputs --------------------------------------------------------------------------------------------
    @property
    def is_rank_zero(self) -> bool:
        return D.is_rank_zero()

    def epoch_dir(self, trainer: Trainer, epoch: int) -> Path:
        """<run folder>/interp/<name>/epoch_<NNN>/ (created on rank 0 only)."""
        path = Path(trainer.default_root_dir) / "interp" / self.name / f"epoch_{epoch:03d}"
        if self.is_rank_zero:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, iterable: Iterable, desc: str, total: int | None = None):
        """A progress bar on rank 0 only."""
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=f"{self.name}: {desc}", total=total, leave=False, disable=not self.is_rank_zero)

    @staticmethod
    def wandb_loggers(trainer: Trainer) -> list:
        from pytorch_lightning.loggers import WandbLogger
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def log_images(self, trainer: Trainer, key: str, paths: list[Path | str], captions: list[str] | None = None):
        """Rank 0 only: PNG files to W&B under `interp/<name>/<key>`, stepped by the trainer's global step."""
        if not self.is_rank_zero:
            return
        loggers = self.wandb_loggers(trainer)
        if not loggers or not paths:
            return
        from PIL import Image
        sizes = set()
        for p in paths:
            with Image.open(p) as im:
                sizes.add(im.size)
        # W&B shows one image list per key and needs equal sizes in it: figures of different sizes get a key each
        groups = [(f"interp/{self.name}/{key}", list(paths), captions)] if len(sizes) == 1 else [
            (f"interp/{self.name}/{key}/{Path(p).stem}", [p], [captions[i]] if captions else None)
            for i, p in enumerate(paths)]
        for lg in loggers:
            for wandb_key, group, caps in groups:
                extra = {"caption": list(caps)} if caps else {}
                lg.log_image(key=wandb_key, images=[str(p) for p in group], step=trainer.global_step, **extra)

    def log_table(self, trainer: Trainer, key: str, columns: list[str], rows: list[list]):
        if not self.is_rank_zero:
            return
        for lg in self.wandb_loggers(trainer):
            lg.log_table(key=f"interp/{self.name}/{key}", columns=columns, data=rows, step=trainer.global_step)

    # ----- checkpoint state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_metrics": self.last_metrics, "errors": self.errors,
                "disabled": self.disabled, "seconds": self.seconds, "runs": self.runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.errors = list(state_dict.get("errors", []))
        self.disabled = bool(state_dict.get("disabled", False))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.runs = int(state_dict.get("runs", 0))


def is_last_epoch(trainer) -> bool:
    """The epoch that ends the fit by its epoch limit (never with max_epochs -1: Lightning's unlimited)."""
    limit = trainer.max_epochs
    return limit is not None and limit > 0 and trainer.current_epoch + 1 >= limit


def interpretation_record(callbacks: Iterable, fit_seconds: float | None = None) -> dict[str, Any]:
    """What the interpretation callbacks cost and which of them failed, for metrics.json: `interp_seconds` and
    `interp_runs` per callback, `interp_errors` (callback, epoch, rank, error, traceback), and with the wall time of
    `trainer.fit` also `training_seconds` (fit time without the callbacks: what training itself cost) and
    `interp/overhead` = callback seconds of this fit / training_seconds, the figure a budget is set in (0.1 = the
    callbacks add a tenth to the training time). `interp_seconds` and `interp_total_seconds` count every start of a
    resumed run; the overhead only this fit (`trainer.fit` times only this start)."""
    cbs = [cb for cb in callbacks if isinstance(cb, InterpretationCallback)]
    record: dict[str, Any] = {"interp_seconds": {cb.name: round(cb.seconds, 3) for cb in cbs if cb.runs},
                              "interp_runs": {cb.name: cb.runs for cb in cbs if cb.runs},
                              "interp_errors": [e for cb in cbs for e in cb.errors]}
    total = sum(cb.seconds for cb in cbs)
    record["interp_total_seconds"] = round(total, 3)
    if fit_seconds is not None:
        this_fit = sum(cb.seconds - cb.seconds_before_fit for cb in cbs)   # a resumed run's earlier starts excluded
        training = max(float(fit_seconds) - this_fit, 1e-9)
        record["training_seconds"] = round(training, 3)
        record["interp/overhead"] = round(this_fit / training, 4)
    return record


def overhead_line(record: dict[str, Any]) -> str:
    """The run's one line about its interpretation cost: "interpretation took 8.1% of training (dissection 3.2 s,
    attribution 2.9 s, ...; 12.3 s in all, training 151.0 s)", callbacks largest first."""
    secs = sorted((record.get("interp_seconds") or {}).items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{name} {sec:.1f} s" for name, sec in secs) or "no callback ran"
    total = float(record.get("interp_total_seconds", 0.0))
    if "interp/overhead" not in record:
        return f"interpretation took {total:.1f} s ({parts})"
    return (f"interpretation took {100 * record['interp/overhead']:.1f}% of training ({parts}; {total:.1f} s in all, "
            f"training {record['training_seconds']:.1f} s)")


def _check_int(value, option: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ConfigError(f"{option}={value!r}: must be an integer >= {minimum}")
    if int(value) < minimum:
        raise ConfigError(f"{option}={value}: must be >= {minimum}")


def check_int(value, option: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer setting, or a ConfigError naming the option (None allowed when allow_none)."""
    if value is None and allow_none:
        return None
    _check_int(value, option, minimum)
    return int(value)


def check_fraction(value, option: str, low: float = 0.0, high: float = 1.0, inclusive_high: bool = False) -> float:
    """A float in (low, high) (or (low, high]), or a ConfigError naming the option."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}={value!r}: must be a number in ({low}, {high}{']' if inclusive_high else ')'}")
    ok = low < v < high or (inclusive_high and v == high)
    if not ok:
        raise ConfigError(f"{option}={value}: must lie in ({low}, {high}{']' if inclusive_high else ')'}")
    return v


def forward_hooks(modules, hook):
    """Deprecated: use core.probe.capture / core.probe.hooks. Kept until every callback is converted."""
    from core.probe import hooks
    return hooks((m, hook, False) for m in modules)
