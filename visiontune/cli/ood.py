"""`visiontune ood fit`: a thin layer over visiontune.ood.fit, for runs trained before the OOD flag
or to refit with another k or share kept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import visiontune

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)
ood_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@ood_app.command()
def fit(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `visiontune train`.")],
    k: Annotated[int | None, Opt(help="KNN: the neighbour whose distance is the score [default: one per "
                                      "1,000 training images, at least 1].")] = None,
    keep: Annotated[float, Opt(help="Share of the run's validation images the threshold keeps in "
                                    "distribution.")] = 0.95,
    batch_size: Annotated[int | None, Opt(help="Images per batch [default: planned for the device].")] = None,
    workers: Annotated[int | None, Opt(help="Image loading processes [default: planned].")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Fit the OOD scorers of a run (energy, KNN on its training features; thresholds on validation):
    predict, evaluate and serve then carry `ood_score` and `ood` on every image."""
    from visiontune.ood.fit import fit_ood

    run = visiontune.load_run(run_dir)
    record = fit_ood(run, k=k, keep=keep, batch_size=batch_size, workers=workers, device=device)
    thresholds = ", ".join(f"{name} {value:.4g}" for name, value in record["thresholds"].items())
    stdout.print(f"fitted on {record['train_images']} training images (k={record['k']}); thresholds from "
                 f"{record['val_images']} validation images: {thresholds}", markup=False)
    stdout.print(f"flagged: {record['primary']} score above its threshold ({record['val_flagged']:.1%} of "
                 f"validation); written: {run.dir / 'ood.json'}", markup=False)
