"""`visiontune features` and `visiontune probe`: a thin layer over `visiontune.features`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from visiontune.cli import shards
from visiontune.cli.shards import FilesList, ShardSpec
from visiontune.config import TrainConfig

stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Opt = typer.Option
SPLIT_DEFAULTS = {name: TrainConfig.model_fields[name].default for name in ("val_fraction", "test_fraction", "seed")}

Data = Annotated[str, typer.Argument(help="Image folder, split folder or CSV file (split as `train` splits it).")]
OptionalData = Annotated[Optional[str], typer.Argument(
    help="Image folder, split folder or CSV file (split as `train` splits it); or --files LIST.")]
Model = Annotated[str | None, Opt(help="timm backbone name.")]
RunDir = Annotated[Path | None, Opt("--run", help="A trained run directory instead of --model: its fine-tuned backbone.")]
Layers = Annotated[str | None, Opt(help="Comma-separated layer names, e.g. layer3,layer4 [default: the last].")]
Pool = Annotated[str, Opt(help="avg | max (one vector, layers concatenated) | none (a grid per layer).")]
Weights = Annotated[Path | None, Opt(help="Local backbone weights (safetensors or state dict).")]
Pretrained = Annotated[bool, Opt("--pretrained/--no-pretrained", help="Pretrained backbone (with --model).")]
ImageSize = Annotated[int | None, Opt(help="Square input size [default: the backbone's or the run's].")]
ProjectDim = Annotated[int | None, Opt(help="Project pooled features to this many dimensions.")]
Projection = Annotated[str, Opt(help="random (seeded Gaussian) | pca (fitted on the train split).")]
LabelRegex = Annotated[str | None, Opt(help="Regex with the label as group 'label' or group 1.")]
ValFraction = Annotated[float, Opt(help="Validation share when splitting.")]
TestFraction = Annotated[float, Opt(help="Test share when splitting.")]
Seed = Annotated[int, Opt(help="Split seed (as in train), projection and random init.")]
BatchSize = Annotated[int, Opt(help="Images per batch.")]
Workers = Annotated[int | None, Opt(help="Decoding worker processes; default from free cores.")]
Threads = Annotated[int | None, Opt(help="torch threads; default from free cores.")]
Device = Annotated[str, Opt(help="auto | cpu | cuda")]


def features(
    out: Annotated[Path, Opt(help="Output file: .npz or .safetensors.")],
    data: OptionalData = None,
    files: FilesList = None,
    shard: ShardSpec = None,
    model: Model = None,
    run: RunDir = None,
    layers: Layers = None,
    pool: Pool = "avg",
    weights: Weights = None,
    pretrained: Pretrained = True,
    image_size: ImageSize = None,
    project_dim: ProjectDim = None,
    projection: Projection = "random",
    label_regex: LabelRegex = None,
    val_fraction: ValFraction = SPLIT_DEFAULTS["val_fraction"],
    test_fraction: TestFraction = SPLIT_DEFAULTS["test_fraction"],
    seed: Seed = SPLIT_DEFAULTS["seed"],
    batch_size: BatchSize = 32,
    workers: Workers = None,
    threads: Threads = None,
    device: Device = "auto",
) -> None:
    """Write frozen features of intermediate layers with paths, labels and splits."""
    from visiontune.features.extraction import extract

    chosen = shards.resolve(shard)
    result = extract(
        data if files is None and data is not None else shards.inputs([data] if data else None, files), out=out,
        shard=chosen, model=model, run=run, layers=layers.split(",") if layers else None, pool=pool, weights=weights,
        pretrained=pretrained, image_size=image_size, project_dim=project_dim, projection=projection,
        label_regex=label_regex, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        batch_size=batch_size, workers=workers, threads=threads, device=device,
    )
    _print_skipped(result["skipped"])
    if chosen is not None:
        shards.print_part(chosen, Path(result["out"]), result["shard_complete"], out)
        if result["shard_complete"] or not result["images"]:
            return
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in result["arrays"].items())
    stdout.print(f"{result['images']} images ({', '.join(result['layers'])}): {shapes} written to {result['out']} "
                 f"in {result['timings']['total_s']:.1f} s", markup=False)


def probe(
    data: Annotated[str, typer.Argument(help="Data source as for `features`, or a feature file it wrote (.npz / .safetensors).")],
    model: Model = None,
    run: RunDir = None,
    classifier: Annotated[str, Opt(help="logreg | svm | knn")] = "logreg",
    layers: Layers = None,
    pool: Pool = "avg",
    weights: Weights = None,
    pretrained: Pretrained = True,
    image_size: ImageSize = None,
    project_dim: ProjectDim = None,
    projection: Projection = "random",
    label_regex: LabelRegex = None,
    val_fraction: ValFraction = SPLIT_DEFAULTS["val_fraction"],
    test_fraction: TestFraction = SPLIT_DEFAULTS["test_fraction"],
    seed: Seed = SPLIT_DEFAULTS["seed"],
    batch_size: BatchSize = 32,
    workers: Workers = None,
    threads: Threads = None,
    device: Device = "auto",
    out: Annotated[Path | None, Opt(help="Output folder [default: probes/<timestamp>-<model>-<classifier>].")] = None,
) -> None:
    """Fit a scikit-learn classifier on frozen features (hyperparameter chosen on val); metrics for val and test."""
    from visiontune.features.probes import probe as run_probe

    summary = run_probe(
        data, classifier=classifier, model=model, run=run, out=out, label_regex=label_regex,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        layers=layers.split(",") if layers else None, pool=pool, weights=weights, pretrained=pretrained,
        image_size=image_size, project_dim=project_dim, projection=projection, batch_size=batch_size,
        workers=workers, threads=threads, device=device,
    )
    _print_skipped(summary["skipped"])
    stdout.print(f"{classifier} on {summary['dim']}-d features, chosen on val: {summary['chosen']}", markup=False)
    for split in ("val", "test"):
        if split in summary:
            ci = summary[split]["bootstrap_95ci"]
            stdout.print(
                f"{split}: {summary[split]['n']} images, accuracy {summary[split]['accuracy']:.4f} "
                f"(95% CI {ci['accuracy'][0]:.3f}-{ci['accuracy'][1]:.3f}), macro-F1 {summary[split]['f1_macro']:.4f}"
                + (" (optimistic: the classifier was chosen on val)" if split == "val" else ""), markup=False)
    stdout.print(f"written: {summary['out']}", markup=False)


def _print_skipped(skipped: list[dict]) -> None:
    for row in skipped:
        err.print(f"skipped {row['path']}: {row['reason']}", markup=False)


def register(app: typer.Typer) -> None:
    """Add `features` and `probe` to the main app."""
    app.command()(features)
    app.command()(probe)
