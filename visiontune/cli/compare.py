"""`visiontune compare` and `visiontune lr-find`: choosing a backbone and a learning rate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import visiontune
from visiontune.cli.train_options import (
    FORWARDING,
    TRAIN_OPTIONS_HELP,
    parse_train_options,
)

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)


def compare(
    ctx: typer.Context,
    models: Annotated[str, Opt(help="Comma-separated timm model names.")] = "resnet18,resnet34,resnet50",
    out: Annotated[Path | None, Opt(help="Folder for the table, plot, split and runs (default runs/<time>-compare).")] = None,
    timing_batch: Annotated[int, Opt(help="Images per batch when timing inference.")] = 32,
    timing_repeats: Annotated[int, Opt(help="Timed batches per model (the median is reported).")] = 10,
) -> None:
    """Train several backbones with one recipe and split; tabulate test accuracy, macro-F1, size, speed."""
    cfg = parse_train_options(ctx)
    from visiontune.comparison import format_rows, timing_note

    result = visiontune.compare(config=cfg, models=models, out=out, timing_batch=timing_batch,
                                timing_repeats=timing_repeats)
    headers, cells = format_rows(result.rows)
    table = Table(title=f"{cfg.data}: the same {result.rows[0]['test_images']} test images for every model")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    stdout.print(table)
    stdout.print(timing_note(result.machine), markup=False)
    stdout.print(f"written: {result.csv}, {result.markdown}, {result.plot}", markup=False)


def lr_find(
    ctx: typer.Context,
    out: Annotated[Path | None, Opt(help="Folder for lr_find.png and lr_find.json (default runs/<time>-lr-find-<model>).")] = None,
    start_lr: Annotated[float, Opt(help="First lr of the sweep.")] = 1e-7,
    end_lr: Annotated[float, Opt(help="Last lr of the sweep.")] = 10.0,
    steps: Annotated[int, Opt(help="Training steps (batches cycle when the data has fewer).")] = 100,
    stage: Annotated[str | None, Opt(help="frozen (the head on a frozen backbone) or unfrozen (everything, "
                                     "from the probe head) [default: the first stage training runs]")] = None,
) -> None:
    """The lr range test: suggest --lr (the head lr of the tested stage) and plot the loss curve."""
    cfg = parse_train_options(ctx)
    from visiontune.training.lr_find import default_out_dir

    result = visiontune.lr_find(config=cfg, start_lr=start_lr, end_lr=end_lr, steps=steps,
                                out=out or default_out_dir(cfg.model), stage=stage)
    stdout.print(
        f"suggested lr: {result.suggestion:.3g} (steepest descent; min loss / 10: {result.min_loss_lr:.3g}); "
        f"{result.notes[0]}\nwritten: {result.plot} and {result.plot.with_suffix('.json')}", markup=False,
    )


def register(app: typer.Typer) -> None:
    common = {"context_settings": FORWARDING, "epilog": TRAIN_OPTIONS_HELP,
              "options_metavar": "DATA [OPTIONS] [TRAIN OPTIONS]"}
    app.command("compare", **common)(compare)
    app.command("lr-find", **common)(lr_find)
