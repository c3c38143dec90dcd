"""`visiontune tune`: a thin layer over `visiontune.tune.tune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from visiontune.config import TrainConfig, build_config

stdout = Console(highlight=False, soft_wrap=True)
Opt = typer.Option
SEARCH_OPTIONS = ("data", "trials", "storage", "study", "timeout", "space", "out", "final", "prune", "config")


def _help(field: str) -> str:
    info = TrainConfig.model_fields[field]
    return f"{info.description or ''} [fixed for every trial]".strip()


def tune(
    data: Annotated[str, typer.Argument(help="Image folder, split folder or CSV file.", show_default=False)],
    trials: Annotated[int, Opt(help="Trials to run in this process (0: only retrain the study's best).")] = 20,
    storage: Annotated[str | None, Opt(help="SQLAlchemy URL of the study storage, e.g. postgresql+psycopg2://user@host/db [default: sqlite:///OUT/study.db].")] = None,
    study: Annotated[str | None, Opt(help="Study name in the storage; an existing study is resumed. [default: visiontune]")] = None,
    timeout: Annotated[float | None, Opt(help="Start no new trial after this many seconds.")] = None,
    space: Annotated[Path | None, Opt(help="YAML search space replacing the default (see OUT/space.yaml).")] = None,
    out: Annotated[Path | None, Opt(help="Output folder [default: tunes/<timestamp>-<model>]; reuse it to resume.")] = None,
    final: Annotated[bool, Opt("--final/--no-final", help="Retrain the best config and evaluate it on test; workers that only add trials pass --no-final.")] = True,
    prune: Annotated[bool, Opt("--prune/--no-prune", help="Stop trials whose per-epoch val score is below the median of earlier trials.")] = True,
    config: Annotated[Path | None, Opt(help="YAML of fixed training options (e.g. a run's config.yaml).")] = None,
    model: Annotated[str | None, Opt(help=_help("model"))] = None,
    weights: Annotated[str | None, Opt(help=_help("weights"))] = None,
    pretrained: Annotated[bool | None, Opt("--pretrained/--no-pretrained", help=_help("pretrained"))] = None,
    image_size: Annotated[int | None, Opt(help=_help("image_size"))] = None,
    epochs: Annotated[int | None, Opt(help=_help("epochs"))] = None,
    freeze_epochs: Annotated[int | None, Opt(help=_help("freeze_epochs") + " (else searched)")] = None,
    batch_size: Annotated[int | None, Opt(help="Batch size, fixed (else searched).")] = None,
    augment: Annotated[str | None, Opt(help="none | light | medium | heavy, fixed (else searched).")] = None,
    monitor: Annotated[str | None, Opt(help="The objective: val_accuracy | val_f1_macro | val_loss [default: val_accuracy]")] = None,
    patience: Annotated[int | None, Opt(help=_help("patience"))] = None,
    label_regex: Annotated[str | None, Opt(help=_help("label_regex"))] = None,
    val_fraction: Annotated[float | None, Opt(help=_help("val_fraction"))] = None,
    test_fraction: Annotated[float | None, Opt(help=_help("test_fraction"))] = None,
    seed: Annotated[int | None, Opt(help="Split seed; trial n trains with seed + n.")] = None,
    device: Annotated[str | None, Opt(help="auto | cpu | cuda")] = None,
    workers: Annotated[int | None, Opt(help=_help("workers"))] = None,
    report: Annotated[bool | None, Opt("--report/--no-report", help="Write report.html for the final run.")] = None,
) -> None:
    """Search the recipe's hyperparameters with Optuna (TPE, pruning); retrain the best, test once."""
    given = {k: v for k, v in locals().items() if v is not None and k not in SEARCH_OPTIONS}
    fixed = TrainConfig.from_yaml(config, **given) if config else build_config(given)
    from visiontune.tune.search import tune as run_tune

    result = run_tune(data, trials=trials, storage=storage, study=study, timeout=timeout, space=space,
                      out=out, final=final, prune=prune, config=fixed)
    _print_trials(result.trials)
    if result.best:
        stdout.print(f"best: trial {result.best['number']}, value {result.best['value']:.4f}; config: {result.best_config}")
    if result.final is not None:
        test = result.final.summary.get("test")
        if test:
            stdout.print(f"final run {result.final.dir}: test accuracy {test['accuracy']:.4f}, macro-F1 {test['f1_macro']:.4f}")
    stdout.print(f"written: {result.out}")


def _print_trials(rows: list[dict]) -> None:
    if not rows:
        return
    table = Table(title="trials")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    stdout.print(table)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
