"""The Optuna side of tuning: a study in any RDB storage, seeded per trial, and pruning by epoch.

Several processes (on one machine or many) may share a study through one storage URL; Optuna
hands each its own trial numbers. The sampler draws from a generator seeded by (seed, trial
number) rather than by process, so concurrent workers never replay each other's random draws and
a single-process search is reproducible.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)

from visiontune.errors import UserError
from visiontune.training.callbacks import MODES

# Training runs are expensive: TPE starts modelling after 5 random trials (Optuna's default is 10).
TPE_STARTUP_TRIALS = 5
PRUNER_STARTUP_TRIALS = 4
SCHEMA_RETRIES = 5


class TrialSeededSampler(BaseSampler):
    """TPE whose randomness for trial n comes from `seed + n`, whichever process runs it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._tpe = self._make(seed)

    @staticmethod
    def _make(seed: int) -> TPESampler:
        # constant_liar: trials still running elsewhere count as bad, so workers spread out.
        return TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, constant_liar=True)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._make(self.seed + trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._tpe.after_trial(study, trial, state, values)


class PruneCallback:
    """A `fit` callback reporting each epoch's monitored value; raises TrialPruned when told."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor

    def on_epoch_end(self, tuner: Any, record: dict) -> None:
        self.trial.report(record[self.monitor], record["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} ({self.monitor} {record[self.monitor]:.4f})")


def open_study(storage: str, name: str, monitor: str, seed: int, prune: bool) -> optuna.Study:
    """Create the study, or load it to resume (or to join other workers) when it exists."""
    direction = "minimize" if MODES[monitor] == "min" else "maximize"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS) if prune else optuna.pruners.NopPruner()
    try:
        study = _create_or_load(storage, name, direction, TrialSeededSampler(seed), pruner)
    except (ArgumentError, ImportError) as exc:
        raise UserError(f"cannot use storage {safe_url(storage)}: {exc}") from None
    except Exception as exc:  # SQLAlchemy's OperationalError and kin: the database cannot be reached
        if type(exc).__module__.startswith("sqlalchemy"):
            raise UserError(f"cannot open storage {safe_url(storage)}: {str(exc).splitlines()[0]}") from None
        raise
    if study.direction.name.lower() != direction:
        raise UserError(
            f"study '{name}' in {safe_url(storage)} was created to {study.direction.name.lower()} "
            f"and cannot continue with monitor {monitor} ({direction}); use another --study"
        )
    known = study.user_attrs.get("monitor")
    if known is None:
        study.set_user_attr("monitor", monitor)
    elif known != monitor:
        raise UserError(f"study '{name}' was tuned on {known}, not {monitor}; use another --study or --monitor {known}")
    return study


def _create_or_load(storage: str, name: str, direction: str, sampler: BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Workers starting together on an empty database race to create Optuna's tables (optuna#1092);
    the loser sees a duplicate-object error and, on a retry, the tables the winner made."""
    def create() -> optuna.Study:
        return optuna.create_study(
            storage=storage, study_name=name, direction=direction, load_if_exists=True, sampler=sampler, pruner=pruner,
        )

    for _ in range(SCHEMA_RETRIES - 1):
        try:
            return create()
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            if isinstance(exc, OperationalError) and "already exists" not in str(exc):
                raise  # e.g. the server cannot be reached: no point in waiting
            time.sleep(0.5 + random.random())
    return create()


def safe_url(url: str) -> str:
    """The storage URL with any password masked, for messages and summary.json."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url
