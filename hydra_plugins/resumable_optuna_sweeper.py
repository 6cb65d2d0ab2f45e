"""The Optuna sweeper of hydra-optuna-sweeper 1.3.0, made resumable (conf/hparams_search/optuna.yaml).

Hydra instantiates sweepers only from the `hydra_plugins` namespace package, hence this folder at the repository
root (no __init__.py in hydra_plugins/: the namespace also holds the installed plugins).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(_OptunaSweeper):
    """hydra-optuna-sweeper 1.3.0 whose study survives a killed sweep (conf/hparams_search/optuna.yaml).

    With a database `storage` (a SQLite file in the sweep folder), starting the same sweep again (same
    `hydra.sweep.dir`, study name and storage) continues the study instead of starting over:
    - `n_trials` is the study's total: trials that already finished (complete, pruned or failed) count, so only the
      missing ones run, and a finished study runs none (it only rewrites optimization_results.yaml);
    - job folders continue the numbering (folder N = trial N), so finished jobs' folders are never overwritten;
    - a trial that was running when the sweep died is marked failed with user attribute `interrupted`, its
      partial folder moves to `<sweep dir>/interrupted/<N>`, and its parameters are queued to run again first;
    - the sampler draws from a fresh random state, so a seeded sampler does not replay the first trials' draws.
    The plugin itself (study created with load_if_exists=True, but n_trials more trials and job numbers from 0)
    would overwrite the finished jobs' folders and exceed the budget.
    """

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        impl = self.sweeper
        if impl.storage is None:
            return
        if impl.study_name is None:
            log.warning("hydra.sweeper.study_name is null: every start creates a new study, nothing resumes")
            return
        import optuna
        import sqlalchemy
        from optuna.trial import TrialState

        if int(sqlalchemy.__version__.split(".")[0]) >= 2:
            raise RuntimeError(f"Optuna {optuna.__version__} cannot use database storage with SQLAlchemy "
                               f"{sqlalchemy.__version__} (its schema-version check fails); install the project's "
                               "pinned versions (`make install`: sqlalchemy<2) or set hydra.sweeper.storage=null")
        url = str(impl.storage)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.get_storage(url)  # one storage object for the study and the edits below
        try:
            study = optuna.load_study(study_name=impl.study_name, storage=storage, sampler=impl.sampler)
        except KeyError:  # no such study yet: a new sweep
            log.info("Optuna study %r: new, in %s", impl.study_name, url)
            return
        study_id = storage.get_study_id_from_name(impl.study_name)
        sweep_dir = Path(config.hydra.sweep.dir)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state(trial_id, TrialState.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # enqueue_trial is "experimental" in optuna 2.x
                study.enqueue_trial(dict(trial.params))
            job = sweep_dir / str(trial.number)
            if job.is_dir():
                (sweep_dir / "interrupted").mkdir(exist_ok=True)
                job.rename(sweep_dir / "interrupted" / job.name)
            log.warning("Optuna trial %d was interrupted (the sweep died while it ran): recorded as failed, its "
                        "folder moved to %s, its parameters %s run again", trial.number,
                        sweep_dir / "interrupted" / job.name, dict(trial.params))
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]
        impl.n_trials = max(0, impl.n_trials - len(done))
        # the next trial's number (queued trials already have theirs): folder N holds trial N
        impl.job_idx = len([t for t in trials if t.state != TrialState.WAITING])
        if hasattr(impl.sampler, "reseed_rng"):
            impl.sampler.reseed_rng()
        log.info("Optuna study %r resumed from %s: %d trial(s) finished, %d to run (trial and folder numbers "
                 "continue at %d)", impl.study_name, url, len(done), impl.n_trials, impl.job_idx)
