"""Hyperparameter search over the fine-tuning recipe with Optuna, keeping the test split out of it.

The data is split once, up front, into OUT/splits.csv. Trials train on a copy holding only the
train and val rows (OUT/trials_data.csv), so no trial can read a test image; the search optimises
validation scores, which therefore become optimistic. The best configuration is then retrained on
the full split and evaluated once on test, the only honest number of the search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from visiontune.config import TrainConfig, build_config
from visiontune.data.samples import Sample
from visiontune.data.splits import write_splits_csv
from visiontune.errors import UserError
from visiontune.io import write_text_atomic
from visiontune.locking import locked_dir
from visiontune.run import Run
from visiontune.runformat import SUMMARY_FILE
from visiontune.training.finetune import fit
from visiontune.training.reuse import split_once, train_or_reuse
from visiontune.tune.outputs import (
    best_trial,
    importances,
    trial_rows,
    write_plots,
    write_trials_csv,
)
from visiontune.tune.space import Param, load_space, space_yaml
from visiontune.tune.study import PruneCallback, open_study, safe_url

log = logging.getLogger(__name__)
SUMMARY_METRIC = {"val_accuracy": "accuracy", "val_f1_macro": "f1_macro", "val_loss": "loss"}
DEFAULT_STUDY = "visiontune"


@dataclass
class TuneResult:
    out: Path
    study: optuna.Study
    ran: list[int]  # numbers of the trials this call ran (the study may hold other workers' too)
    trials: list[dict]  # every trial of the study, as written to trials.csv
    best: dict | None  # {"number", "value", "params", "seed"} of the best completed trial
    best_config: Path | None
    final: Run | None  # the best config retrained and evaluated on test
    importances: dict[str, float] = field(default_factory=dict)


def tune(
    data: str | os.PathLike | None,
    *,
    trials: int = 20,
    storage: str | None = None,
    study: str | None = None,
    timeout: float | None = None,
    space: str | os.PathLike | dict | None = None,
    out: str | os.PathLike | None = None,
    final: bool = True,
    prune: bool = True,
    progress: bool = True,
    config: TrainConfig | None = None,
    **options: Any,
) -> TuneResult:
    """Run `trials` Optuna trials of `visiontune.fit` on `data`, then retrain the best on test.

    `options` (or `config`) are fixed TrainConfig fields; the rest of `space` (a YAML file or a
    mapping, default `DEFAULT_SPACE`) is searched. `storage` is any SQLAlchemy URL (default
    sqlite:///OUT/study.db); an existing study of that name is resumed, and processes sharing
    one storage and `study` name share the search. `final=False` skips the retraining (for
    extra workers); `trials=0` only retrains the study's best.
    """
    if trials < 0:
        raise UserError(f"trials must be 0 or more (got {trials})")
    if timeout is not None and timeout <= 0:
        raise UserError(f"timeout must be positive (got {timeout})")
    fixed = {**(config.model_dump(exclude_unset=True) if config else {}), **options}
    fixed.pop("out", None)
    data = data if data is not None else fixed.get("data")
    if data is None:
        raise UserError("no data given: pass an image folder or CSV file")
    fixed.pop("data", None)
    base = build_config({**fixed, "data": str(data)})
    params = load_space(space, fixed)
    out_dir = Path(out).expanduser() if out else Path("tunes") / f"{datetime.now():%Y%m%d-%H%M%S}-{base.model.replace('/', '_')}"
    with ExitStack() as stack:
        if storage is None:  # the default sqlite study lives in OUT: one process there at a time
            stack.enter_context(locked_dir(out_dir))
        else:  # a shared study: workers on one machine may share OUT
            out_dir.mkdir(parents=True, exist_ok=True)
        return _search(base, fixed, params, out_dir, trials, storage, study, timeout, final, prune, progress)


def _search(base: TrainConfig, fixed: dict, params: list[Param], out_dir: Path, trials: int, storage: str | None,
            study: str | None, timeout: float | None, final: bool, prune: bool, progress: bool) -> TuneResult:
    """The search, the retraining of the best and the outputs, in `out_dir`."""
    console = _console(progress)
    splits_csv, trials_csv, fingerprint = _split_once(base, out_dir)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed below
    storage = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    name = study or DEFAULT_STUDY
    the_study = open_study(storage, name, base.monitor, base.seed, prune)
    _check_same_split(the_study, fingerprint)
    write_text_atomic(out_dir / "space.yaml", space_yaml(params))

    ran: list[int] = []
    started = time.perf_counter()
    if trials:
        console.print(f"study '{name}' in {safe_url(storage)}: {len(the_study.trials)} trial(s) so far; running {trials}")
        the_study.optimize(
            lambda trial: _run_trial(trial, params, fixed, trials_csv, out_dir, ran),
            n_trials=trials, timeout=timeout, gc_after_trial=True,
            catch=(torch.cuda.OutOfMemoryError,),  # a batch size too large for the GPU fails that trial only
            callbacks=[lambda s, t: console.print(_trial_line(t, base.monitor), markup=False)],
        )
    search_s = time.perf_counter() - started

    rows = trial_rows(the_study)
    write_trials_csv(rows, out_dir / "trials.csv")
    importance, why_not = importances(the_study)
    write_text_atomic(out_dir / "importances.json", json.dumps({"importances": importance, "note": why_not}, indent=2))
    write_plots(the_study, importance, out_dir)

    best = best_trial(the_study)
    best_info = best_config = final_run = None
    if best is None:
        log.warning("no trial of study '%s' has completed yet; nothing to retrain", name)
    else:
        seed = best.user_attrs.get("seed", base.seed)
        best_info = {"number": best.number, "value": best.value, "params": best.params, "seed": seed}
        cfg = build_config({**fixed, **best.params, "seed": seed, "data": str(splits_csv.resolve())})
        best_config = out_dir / "best_config.yaml"
        write_text_atomic(best_config, yaml.safe_dump(cfg.model_dump(exclude={"out"}), sort_keys=False))
        if final:
            run_dir = out_dir / f"final-{best.number:04d}"
            console.print(f"the best configuration, trained on train and evaluated on test: {run_dir}")
            final_run = train_or_reuse(cfg, run_dir, progress, console)

    result = TuneResult(out_dir, the_study, ran, rows, best_info, best_config, final_run, importance)
    _write_summary(result, storage, name, base.monitor, search_s)
    return result


def _split_once(cfg: TrainConfig, out_dir: Path) -> tuple[Path, Path, str]:
    """OUT/splits.csv (all splits, reused on resume) and OUT/trials_data.csv (train and val only)."""
    splits_csv, samples, _ = split_once(cfg, out_dir)
    trials_csv = out_dir / "trials_data.csv"
    if not any(s.split == "test" for s in samples):
        log.warning("the data has no test split: the final run can only be scored on val, which the search optimised")
    write_splits_csv([s for s in samples if s.split != "test"], trials_csv)
    return splits_csv, trials_csv, _fingerprint(samples)


def _fingerprint(samples: list[Sample]) -> str:
    """Of (file name, label, split): equal on every machine that splits the same data the same way."""
    rows = sorted(f"{Path(s.path).name}\t{s.label}\t{s.split}" for s in samples)
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()


def _check_same_split(study: optuna.Study, fingerprint: str) -> None:
    """Workers sharing a study must share the split, or one's test images are another's training."""
    known = study.user_attrs.get("split_sha1")
    if known is None:
        study.set_user_attr("split_sha1", fingerprint)
    elif known != fingerprint:
        raise UserError(
            f"study '{study.study_name}' was searched on a different train/val/test split of the data; "
            "use the same data and split options (or another --study)"
        )


def _run_trial(trial: optuna.Trial, params: list[Param], fixed: dict, trials_csv: Path, out_dir: Path, ran: list[int]) -> float:
    ran.append(trial.number)
    values = {p.name: p.suggest(trial) for p in params}
    seed = build_config(fixed).seed + trial.number
    trial.set_user_attr("seed", seed)
    run_dir = out_dir / "trials" / f"{trial.number:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)  # left by a crashed worker of a different study file
    cfg = build_config({**fixed, **values, "seed": seed, "data": str(trials_csv.resolve()), "out": str(run_dir), "report": False})
    try:
        run = fit(config=cfg, callbacks=[PruneCallback(trial, cfg.monitor)], progress=False)
    finally:  # the best config is retrained at the end: trial weights would only fill the disk
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run.summary["val"][SUMMARY_METRIC[cfg.monitor]]


def _write_summary(result: TuneResult, storage: str, name: str, monitor: str, search_s: float) -> None:
    states: dict[str, int] = {}
    for row in result.trials:
        states[row["state"]] = states.get(row["state"], 0) + 1
    final = None
    if result.final is not None:
        summary = result.final.summary
        final = {"run": str(result.final.dir), **{s: summary[s] for s in ("val", "test") if s in summary}}
    summary = {
        "study": name, "storage": safe_url(storage), "monitor": monitor,
        "direction": result.study.direction.name.lower(), "trials_by_state": states, "ran_here": result.ran,
        "search_s": search_s, "best": result.best,
        "best_config": str(result.best_config) if result.best_config else None,
        "importances": result.importances, "final": final,
    }
    write_text_atomic(result.out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))


def _trial_line(trial: optuna.trial.FrozenTrial, monitor: str) -> str:
    seconds = f"{trial.duration.total_seconds():.1f}s" if trial.duration else ""
    if trial.state.name == "COMPLETE":
        return f"trial {trial.number}: {monitor} {trial.value:.4f} ({seconds})"
    last = max(trial.intermediate_values, default=None)
    return f"trial {trial.number}: {trial.state.name.lower()}" + (f" after epoch {last}" if last else "") + f" ({seconds})"


def _console(progress: bool):
    from rich.console import Console

    return Console(quiet=not progress, highlight=False, soft_wrap=True, stderr=True)
