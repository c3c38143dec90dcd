"""What a search leaves behind: the trials table, parameter importances and their plots."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from visiontune.io import atomic_write, write_text_atomic

log = logging.getLogger(__name__)


def trial_rows(study: optuna.Study) -> list[dict]:
    """One plain row per trial of the study (every worker's), ordered by trial number."""
    names = sorted({name for t in study.trials for name in t.params})
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        duration = t.duration.total_seconds() if t.duration else None
        last_epoch = max(t.intermediate_values, default=None)
        rows.append({
            "number": t.number, "state": t.state.name, "value": t.value,
            "epochs": last_epoch, "duration_s": round(duration, 3) if duration is not None else None,
            "seed": t.user_attrs.get("seed"), **{name: t.params.get(name) for name in names},
        })
    return rows


def write_trials_csv(rows: list[dict], path: Path) -> None:
    columns = list(rows[0]) if rows else ["number", "state", "value", "epochs", "duration_s", "seed"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Parameter importances (fANOVA on completed trials), or {} and the reason there are none."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, f"importances need at least 2 completed trials ({len(complete)} so far)"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError) as exc:
        return {}, f"importances could not be computed: {exc}"
    # e.g. "Parameter importances will be equal" when the completed trials scored alike
    return found, "; ".join(str(w.message) for w in caught) or None


def write_plots(study: optuna.Study, importance: dict[str, float], out: Path) -> list[Path]:
    """optimization_history.png and (when there are importances) param_importances.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written: list[Path] = []
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return written
    # Optuna's plots switch the global matplotlib style; rc_context puts it back afterwards.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # "experimental" backend
        plots = [("optimization_history.png", optuna_plots.plot_optimization_history)]
        if importance:
            plots.append(("param_importances.png", optuna_plots.plot_param_importances))
        for name, plot in plots:
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as exc:
                log.warning("could not draw %s: %s", name, exc)
                continue
            figure = axes.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            atomic_write(out / name, lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=100))
            plt.close(figure)
            written.append(out / name)
    return written


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return None
    return study.best_trial
