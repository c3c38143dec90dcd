"""`visiontune shift`: a thin layer over visiontune.shift.report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import visiontune

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)


def shift(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `visiontune train`.")],
    target: Annotated[Path, Opt(help="Images from the other domain: class folders (labelled, when the names "
                                     "are the run's classes), a CSV file, or a folder of images.")],
    name: Annotated[str | None, Opt(help="The report's folder, RUN/shift/NAME (default: the target's "
                                         "name).")] = None,
    batch_size: Annotated[int | None, Opt(help="Images per batch (default: planned for the device).")] = None,
    workers: Annotated[int | None, Opt(help="Image loading processes (default: planned).")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Domain-shift report: how far the target images are from the run's held-out images (OOD AUROC),
    accuracy per domain, a t-SNE of both, per-class shift and Grad-CAM of matched pairs."""
    from visiontune.shift.report import shift_report

    run = visiontune.load_run(run_dir)
    result = shift_report(run, target, name, batch_size=batch_size, workers=workers, device=device)
    images = result["images"]
    stdout.print(f"source: {images['source']} {result['source_split']} images; target: {images['target']} images "
                 f"({result['target_labelled']} of the run's classes)", markup=False)
    auroc = ", ".join(f"{scorer} {value:.3f}" for scorer, value in result["auroc"].items())
    stdout.print(f"OOD AUROC, target vs source: {auroc}", markup=False)
    if "flagged" in result:
        flagged = result["flagged"]
        stdout.print(f"flagged ({flagged['scorer']}): source {flagged['source']:.1%}, target "
                     f"{flagged['target']:.1%}", markup=False)
    for domain, block in result["accuracy"].items():
        if block is not None:
            low, high = block["ci95"]
            stdout.print(f"{domain} accuracy: {block['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, "
                         f"{block['images']} images)", markup=False)
    stdout.print(result["reading"], markup=False)
    for note in result["notes"]:
        stdout.print(f"note: {note}", markup=False)
    stdout.print(f"written: {result['report']}", markup=False)
