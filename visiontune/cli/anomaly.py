"""`visiontune anomaly fit | predict | evaluate`: a thin layer over `visiontune.anomaly`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visiontune.cli import shards
from visiontune.cli.shards import FilesList, ShardSpec
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.errors import UserError, require_some_read

anomaly_app = typer.Typer(
    help="Unsupervised defect detection (PatchCore, PaDiM, reverse distillation) trained on good images only.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Opt = typer.Option

Workers = Annotated[Optional[int], Opt(help="Image loading processes (default: on a CPU, planned with torch's "
                                               "threads for the cores free now, none up to 3; on a GPU, cores - 1, "
                                               "at most 4).")]
Device = Annotated[str, Opt(help="auto | cpu | cuda")]
BatchSize = Annotated[int, Opt(help="Images per batch.")]
Backend = Annotated[str, Opt(help="auto | torch | onnx: what scores the decoded images; onnx is the model's "
                                  "exported scoring graph in ONNX Runtime (CPU), auto uses it on a CPU where "
                                  "onnxruntime is installed.")]


@contextmanager
def _user_errors() -> Iterator[None]:
    """A user's mistake is one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except UserError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


@anomaly_app.command()
def fit(
    good: Annotated[Path, typer.Argument(help="Folder of good images (or an MVTec AD category root).")],
    out: Annotated[Path, Opt(help="Model directory to write.")],
    method: Annotated[str, Opt(help="patchcore | padim | reverse-distillation")] = "patchcore",
    backbone: Annotated[str, Opt(help="Any timm CNN name.")] = "wide_resnet50_2",
    layers: Annotated[Optional[str], Opt(help="Comma-separated layer names, e.g. layer2,layer3 "
                                              "[default: stride 8+16 for patchcore, 4+8+16 for padim and "
                                              "reverse-distillation]")] = None,
    image_size: Annotated[Optional[int], Opt(help="Square input size [default: the backbone's].")] = None,
    coreset_ratio: Annotated[float, Opt(help="PatchCore: share of training patches kept.")] = 0.01,
    n_features: Annotated[Optional[int], Opt(help="PaDiM: random channels kept [default: 100, 550 "
                                                   "above 1,000 channels].")] = None,
    weights: Annotated[Optional[Path], Opt(help="Local backbone weights (safetensors or state dict).")] = None,
    pretrained: Annotated[bool, Opt("--pretrained/--no-pretrained", help="Pretrained backbone.")] = True,
    val_defects: Annotated[Optional[Path], Opt("--val-defects", "--defects", help=(
        "Labelled defect images (a folder, or a folder of defect-type folders) to set the threshold on: "
        "F1-optimal, or at --target-recall. --defects is the old, deprecated name."))] = None,
    target_recall: Annotated[Optional[float], Opt(help=(
        "With --val-defects: the highest threshold that flags at least this share (0-1] of them."))] = None,
    calibration: Annotated[str, Opt(help="auto | kfold | holdout: the good scores behind the threshold are "
                                          "out-of-fold scores of all images (auto: below 100 images) or "
                                          "those of a held-out share.")] = "auto",
    holdout_fraction: Annotated[float, Opt(help="Good images held out to set the threshold (--calibration holdout).")] = 0.1,
    false_alarm_rate: Annotated[float, Opt(help="Threshold = this upper quantile of held-out good scores.")] = 0.01,
    batch_size: BatchSize = 16,
    workers: Workers = None,
    device: Device = "auto",
    seed: Annotated[int, Opt(help="Seed of the hold-out split, projections and random init.")] = 0,
    max_pixels: Annotated[int, Opt(help="Larger images are skipped (decompression bombs).")] = DEFAULT_MAX_PIXELS,
) -> None:
    """Fit a detector on good images and save it with its threshold."""
    from visiontune import anomaly

    with _user_errors():
        model = anomaly.fit(
            good, method=method, backbone=backbone, layers=layers.split(",") if layers else None,
            image_size=image_size, coreset_ratio=coreset_ratio, n_features=n_features, weights=weights,
            pretrained=pretrained, val_defects=val_defects, holdout_fraction=holdout_fraction,
            false_alarm_rate=false_alarm_rate, out=out, batch_size=batch_size, workers=workers,
            device=device, seed=seed, max_pixels=max_pixels, calibration=calibration, target_recall=target_recall,
        )
    info = model.fit_info_
    _print_skipped(info["skipped"])
    stdout.print(
        f"fitted {method} on {info['train_images']} images ({backbone}: {', '.join(model.extractor.layers)}, "
        f"{model.image_size} px) in {info['timings']['total_s']:.1f} s; threshold {model.threshold_:.4g} "
        f"({model.threshold_rule_['rule']}, from {info['calibration']['scores']} good scores: "
        f"{info['calibration']['method']})\nsaved to {out}"
    )


@anomaly_app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by `anomaly fit`.")],
    out: Annotated[Path, Opt(help="CSV of path, score, decision, threshold, heatmap, reason.")],
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Images or folders of images.")] = None,
    files: FilesList = None,
    shard: ShardSpec = None,
    heatmaps: Annotated[Optional[Path], Opt(help="Folder for heat-map overlays.")] = None,
    batch_size: BatchSize = 16,
    workers: Workers = None,
    device: Device = "auto",
    backend: Backend = "auto",
) -> None:
    """Score images: anomaly score, decision at the saved threshold, optional heat-map overlays."""
    from visiontune import anomaly
    from visiontune.devices import reuse_freed_memory

    reuse_freed_memory()  # this process ends with the command

    with _user_errors():
        chosen = shards.resolve(shard)
        images = paths if paths and files is None else shards.inputs(paths, files)  # folders: once the model loads
        rows = anomaly.predict(model_dir, images, out=out, heatmaps=heatmaps,
                               batch_size=batch_size, workers=workers, device=device, backend=backend,
                               shard=chosen)
    if chosen is not None:
        shards.print_part(chosen, chosen.part_path(out), not rows, out)
        if not rows:
            return
    skipped = [{"path": r["path"], "reason": r["reason"]} for r in rows if r["decision"] == "skipped"]
    _print_skipped(skipped)
    with _user_errors():
        require_some_read(len(rows) - len(skipped), len(skipped), "scored")
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    stdout.print(f"{flagged} of {len(rows) - len(skipped)} images anomalous; scores in {out}")


@anomaly_app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by `anomaly fit`.")],
    data: Annotated[Path, Opt(help="Labelled images: MVTec AD layout or good/ + defect folders.")],
    out: Annotated[Optional[Path], Opt(help="Folder for metrics.json and report.html "
                                             "[default: MODEL_DIR/evaluation].")] = None,
    batch_size: BatchSize = 16,
    workers: Workers = None,
    device: Device = "auto",
    backend: Backend = "auto",
    as_json: Annotated[bool, Opt("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Image AUROC, F1, pixel AUROC and AUPRO with masks, per defect type, and an HTML report."""
    from visiontune import anomaly
    from visiontune.devices import reuse_freed_memory

    reuse_freed_memory()  # this process ends with the command

    with _user_errors():
        metrics = anomaly.evaluate(model_dir, data, out=out or model_dir / "evaluation",
                                   batch_size=batch_size, workers=workers, device=device, backend=backend)
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    _print_skipped(metrics["skipped"])
    table = Table(title=f"{data}")
    for column in ("", "images", "image AUROC", "recall", "pixel AUROC"):
        table.add_column(column, justify="right")
    table.add_row("all", str(metrics["images"]), _fmt(metrics["image_auroc"]),
                  _fmt(metrics["recall_at_threshold"]), _fmt(metrics["pixel_auroc"]))
    for name, row in metrics["per_defect_type"].items():
        table.add_row(name, str(row["images"]), _fmt(row["image_auroc"]), _fmt(row["recall_at_threshold"]),
                      _fmt(row["pixel_auroc"]))
    stdout.print(table)
    stdout.print(
        f"F1 {metrics['f1_at_threshold']:.3f} at the saved threshold {metrics['threshold']:.4g} "
        f"(false alarms {metrics['false_alarm_rate_at_threshold']:.1%}); best F1 {metrics['f1_at_best_threshold']:.3f} "
        f"at {metrics['best_threshold']:.4g}; AUPRO {_fmt(metrics['aupro'])}\nreport: {metrics['report']}"
    )


def _print_skipped(skipped: list[dict]) -> None:
    if skipped:
        stdout.print(f"[yellow]skipped {len(skipped)} file(s):[/yellow]")
        for item in skipped:
            stdout.print(f"  {item['path']}: {item['reason']}", markup=False)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
