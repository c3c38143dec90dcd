"""`visiontune audit`: a thin layer over `visiontune.audit.workflow`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from visiontune.cli.features import (
    BatchSize, Data, Device, ImageSize, LabelRegex, Model, Pretrained, RunDir, Seed, TestFraction, Threads,
    ValFraction, Weights, Workers, SPLIT_DEFAULTS,
)

stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Opt = typer.Option


def audit(
    data: Data,
    model: Model = None,
    run: RunDir = None,
    weights: Weights = None,
    pretrained: Pretrained = True,
    folds: Annotated[int, Opt(help="Folds for the out-of-fold probabilities (lowered to the smallest class).")] = 5,
    fine_tune: Annotated[bool, Opt("--fine-tune", help="Out-of-fold probabilities from the training recipe fine-tuned per fold (--run's recipe, or the defaults for --model) instead of a linear head on frozen features; folds times slower.")] = False,
    epochs: Annotated[int | None, Opt(help="With --fine-tune: epochs per fold [default: the recipe's].")] = None,
    duplicate_similarity: Annotated[float | None, Opt(help="Cosine similarity from which two images are near-duplicates [default: calibrated, see docs/benchmarks.md].")] = None,
    out: Annotated[Path | None, Opt(help="Output folder, new or empty [default: audits/<timestamp>].")] = None,
    image_size: ImageSize = None,
    label_regex: LabelRegex = None,
    val_fraction: ValFraction = SPLIT_DEFAULTS["val_fraction"],
    test_fraction: TestFraction = SPLIT_DEFAULTS["test_fraction"],
    seed: Seed = SPLIT_DEFAULTS["seed"],
    batch_size: BatchSize = 32,
    workers: Workers = None,
    threads: Threads = None,
    device: Device = "auto",
) -> None:
    """Find label issues, near-duplicates (leakage across splits) and outliers; writes OUT/findings.csv, .json, report.html."""
    from visiontune.audit.workflow import audit as run_audit

    record = run_audit(
        data, out=out, model=model, run=run, weights=weights, pretrained=pretrained, folds=folds,
        fine_tune=fine_tune, epochs=epochs, progress=True, duplicate_similarity=duplicate_similarity,
        image_size=image_size, label_regex=label_regex, val_fraction=val_fraction, test_fraction=test_fraction,
        seed=seed, batch_size=batch_size, workers=workers, threads=threads, device=device,
    )
    for row in record["skipped"]:
        err.print(f"skipped {row['path']}: {row['reason']}", markup=False)
    for note in record["warnings"]:
        err.print(f"warning: {note}", markup=False)
    counts = record["counts"]
    stdout.print(f"{record['images']} images, {record['folds']} folds ({record['out_of_fold']}): {counts['label_issue']} label issues, "
                 f"{counts['leakage']} leaked near-duplicates across splits, {counts['near_duplicate']} within a "
                 f"split, {counts['outlier']} outliers in {record['timings']['total_s']:.1f} s", markup=False)
    stdout.print(f"written: {record['out']} (findings.csv, findings.json, report.html)", markup=False)


def check_near_duplicates(data: str, *, features: Path | None, model: str | None, run: Path | None,
                          weights: Path | None, pretrained: bool, image_size: int | None,
                          duplicate_similarity: float | None, device: str, **split) -> int:
    """`check --near-duplicates`: print the audit's near-duplicate pairs; returns how many leak across splits."""
    from visiontune.audit.workflow import near_duplicates

    found = near_duplicates(data, features=features, model=model, run=run, weights=weights, pretrained=pretrained,
                            image_size=image_size, device=device, duplicate_similarity=duplicate_similarity, **split)
    for title, kind in (("near-duplicates across splits (leakage)", "leakage"),
                        ("near-duplicates within a split", "near_duplicate")):
        rows = found[kind]
        if rows:
            stdout.print(f"\n[bold]{title}[/bold] ({len(rows)}, cosine >= {found['similarity']:.3f}, {found['model']})")
            for row in rows:
                same = ", byte-identical" if row["exact"] else ""
                stdout.print(f"  {row['split']}:{row['path']} ~ {row['other_split']}:{row['other_path']} "
                             f"({row['score']:.3f}{same})", markup=False)
    if not found["leakage"] and not found["near_duplicate"]:
        stdout.print(f"no near-duplicates among {found['images']} images (cosine >= {found['similarity']:.3f})")
    return len(found["leakage"])
