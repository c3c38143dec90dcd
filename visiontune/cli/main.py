"""The `visiontune` command: a thin layer over the Python API.

Option names are TrainConfig field names (`--lr-mult` is `lr_mult`). Every option defaults to
None here, meaning "not given": only given options override a `--config` file, and the config's
own defaults fill the rest. Unknown options get click's "did you mean" suggestion.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

import visiontune
from visiontune.cli import shards
from visiontune.cli.adapt import adapt as adapt_command
from visiontune.cli.anomaly import anomaly_app
from visiontune.cli.audit import audit as audit_command
from visiontune.cli.audit import check_near_duplicates
from visiontune.cli.bench import benchmark
from visiontune.cli.caption import caption_app
from visiontune.cli.compare import register as register_compare
from visiontune.cli.detect import detect_app
from visiontune.cli.export import export
from visiontune.cli.features import register as register_features
from visiontune.cli.ood import ood_app
from visiontune.cli.regions import regions as regions_command
from visiontune.cli.serve import serve as serve_command
from visiontune.cli.shards import FilesList, ShardSpec
from visiontune.cli.shift import shift
from visiontune.cli.tune import tune as tune_command
from visiontune.config import LAUNCH_OPTIONS, TrainConfig, build_config
from visiontune.errors import UserError, require_some_read

app = typer.Typer(
    help="Turn a folder of images into a working vision model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


app.add_typer(anomaly_app, name="anomaly", help="Unsupervised defect detection: PaDiM and PatchCore.")
app.add_typer(caption_app, name="caption", help="Image captioning on a frozen backbone's spatial features.")
app.add_typer(detect_app, name="detect", help="Object detection: Faster R-CNN or R-CNN regions, boxes in and out.")
app.add_typer(ood_app, name="ood", help="Out-of-distribution scores of a run's inputs: fit them on an older run.")
app.command()(benchmark)
app.command()(export)
register_compare(app)  # compare, lr-find
app.command(name="tune")(tune_command)
register_features(app)
app.command(name="serve")(serve_command)
app.command(name="adapt")(adapt_command)
app.command()(shift)
app.command(name="audit")(audit_command)
app.command(name="regions")(regions_command)
shards.register(app)  # merge-shards


def _help(field: str) -> str:
    info = TrainConfig.model_fields[field]
    default = info.default
    text = info.description or ""
    return f"{text} [config default: {default}]" if default is not None else text


Opt = typer.Option
DataArg = Annotated[Optional[str], typer.Argument(help="Image folder, split folder or CSV file.", show_default=False)]


@app.command()
def train(
    data: DataArg = None,
    config: Annotated[Optional[Path], Opt(help="YAML file of options (e.g. a run's config.yaml).")] = None,
    resume: Annotated[Optional[Path], Opt(help="Continue an interrupted run directory.")] = None,
    model: Annotated[Optional[str], Opt(help=_help("model"))] = None,
    weights: Annotated[Optional[str], Opt(help=_help("weights"))] = None,
    pretrained: Annotated[Optional[bool], Opt("--pretrained/--no-pretrained", help=_help("pretrained"))] = None,
    image_size: Annotated[Optional[int], Opt(help=_help("image_size"))] = None,
    crop_mode: Annotated[Optional[str], Opt(help=_help("crop_mode"))] = None,
    epochs: Annotated[Optional[int], Opt(help=_help("epochs"))] = None,
    probe: Annotated[Optional[bool], Opt("--probe/--no-probe", help=_help("probe"))] = None,
    freeze_epochs: Annotated[Optional[int], Opt(help=_help("freeze_epochs"))] = None,
    bn: Annotated[Optional[str], Opt(help=_help("bn"))] = None,
    unfreeze_from: Annotated[Optional[str], Opt(help=_help("unfreeze_from"))] = None,
    decoded_cache: Annotated[Optional[bool], Opt("--decoded-cache/--no-decoded-cache", help=_help("decoded_cache"))] = None,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile", help=_help("compile"))] = None,
    feature_cache: Annotated[Optional[bool], Opt("--feature-cache/--no-feature-cache", help=_help("feature_cache"))] = None,
    feature_views: Annotated[Optional[int], Opt(help=_help("feature_views"))] = None,
    feature_precision: Annotated[Optional[str], Opt(help="auto | fp32 | bf16 [config default: auto]")] = None,
    train_bn: Annotated[Optional[bool], Opt("--train-bn/--no-train-bn", help=_help("train_bn"))] = None,
    batch_size: Annotated[Optional[int], Opt(help=_help("batch_size"))] = None,
    lr: Annotated[Optional[str], Opt(help=_help("lr"))] = None,
    lr_mult: Annotated[Optional[float], Opt(help=_help("lr_mult"))] = None,
    weight_decay: Annotated[Optional[float], Opt(help=_help("weight_decay"))] = None,
    schedule: Annotated[Optional[str], Opt(help="flat_cos | one_cycle | cosine [config default: flat_cos]")] = None,
    pct_start: Annotated[Optional[float], Opt(help=_help("pct_start"))] = None,
    warmup_fraction: Annotated[Optional[float], Opt(help=_help("warmup_fraction"))] = None,
    loss: Annotated[Optional[str], Opt(help="ce | bce | focal [config default: ce]")] = None,
    label_smoothing: Annotated[Optional[float], Opt(help=_help("label_smoothing"))] = None,
    focal_alpha: Annotated[Optional[float], Opt(help=_help("focal_alpha"))] = None,
    focal_gamma: Annotated[Optional[float], Opt(help=_help("focal_gamma"))] = None,
    balance: Annotated[Optional[str], Opt(help="none | sampler | weights [config default: none]")] = None,
    augment: Annotated[Optional[str], Opt(help=_help("augment"))] = None,
    crop_scale: Annotated[Optional[float], Opt(help=_help("crop_scale"))] = None,
    monitor: Annotated[Optional[str], Opt(help="val_accuracy | val_f1_macro | val_loss [config default: val_accuracy]")] = None,
    patience: Annotated[Optional[int], Opt(help=_help("patience"))] = None,
    label_regex: Annotated[Optional[str], Opt(help=_help("label_regex"))] = None,
    val_fraction: Annotated[Optional[float], Opt(help=_help("val_fraction"))] = None,
    test_fraction: Annotated[Optional[float], Opt(help=_help("test_fraction"))] = None,
    max_pixels: Annotated[Optional[int], Opt(help=_help("max_pixels"))] = None,
    exclude: Annotated[Optional[str], Opt(help=_help("exclude"))] = None,
    relabel: Annotated[Optional[str], Opt(help=_help("relabel"))] = None,
    report: Annotated[Optional[bool], Opt("--report/--no-report", help=_help("report"))] = None,
    seed: Annotated[Optional[int], Opt(help=_help("seed"))] = None,
    device: Annotated[Optional[str], Opt(help="auto | cpu | cuda [config default: auto]")] = None,
    devices: Annotated[Optional[str], Opt(help=_help("devices"))] = None,
    num_nodes: Annotated[Optional[int], Opt(help=_help("num_nodes"))] = None,
    strategy: Annotated[Optional[str], Opt(help="auto | ddp: " + _help("strategy"))] = None,
    workers: Annotated[Optional[int], Opt(help=_help("workers"))] = None,
    threads: Annotated[Optional[int], Opt(help=_help("threads"))] = None,
    out: Annotated[Optional[str], Opt(help=_help("out"))] = None,
) -> None:
    """Fine-tune a pretrained backbone: a linear probe on frozen features, then everything with discriminative lrs.

    --devices N starts N processes (DDP; README: "Training on several GPUs / nodes").
    """
    given = {k: v for k, v in locals().items() if v is not None and k not in ("config", "resume")}
    if resume is not None:
        other = sorted(set(given) - set(LAUNCH_OPTIONS))
        if other:
            raise UserError(f"--resume takes no options but {', '.join('--' + o.replace('_', '-') for o in LAUNCH_OPTIONS)} "
                            f"(got {', '.join(other)}); the run's config.yaml is used")
        visiontune.fit(resume=resume, **given)
        return
    cfg = TrainConfig.from_yaml(config, **given) if config else build_config(given)
    visiontune.fit(config=cfg)


@app.command()
def check(
    data: Annotated[str, typer.Argument(help="Image folder, split folder or CSV file.")],
    label_regex: Annotated[Optional[str], Opt(help=_help("label_regex"))] = None,
    val_fraction: Annotated[float, Opt(help="Validation share when splitting.")] = 0.1,
    test_fraction: Annotated[float, Opt(help="Test share when splitting.")] = 0.1,
    seed: Annotated[int, Opt(help="Split seed.")] = 0,
    max_pixels: Annotated[int, Opt(help=_help("max_pixels"))] = TrainConfig.model_fields["max_pixels"].default,
    min_size: Annotated[int, Opt(help="Images with a side below this are reported as small.")] = 32,
    as_json: Annotated[bool, Opt("--json", help="Print the report as JSON.")] = False,
    near_duplicates: Annotated[bool, Opt("--near-duplicates", help="Also find near-duplicates (resized, re-encoded, cropped copies) by feature similarity, as `audit` does; needs --model, --run or --features. Leaked ones are warnings.")] = False,
    model: Annotated[Optional[str], Opt(help="With --near-duplicates: the timm backbone computing the features.")] = None,
    run: Annotated[Optional[Path], Opt("--run", help="With --near-duplicates: a trained run's backbone instead of --model.")] = None,
    weights: Annotated[Optional[Path], Opt(help="With --near-duplicates --model: local backbone weights.")] = None,
    pretrained: Annotated[bool, Opt("--pretrained/--no-pretrained", help="With --model: pretrained backbone.")] = True,
    features: Annotated[Optional[Path], Opt(help="With --near-duplicates: pooled features from `visiontune features DATA --out FILE`.")] = None,
    duplicate_similarity: Annotated[Optional[float], Opt(help="Cosine similarity from which two images are near-duplicates [default: audit's, calibrated].")] = None,
    image_size: Annotated[Optional[int], Opt(help="With --near-duplicates: input size [default: the backbone's].")] = None,
    device: Annotated[str, Opt(help="With --near-duplicates: auto | cpu | cuda")] = "auto",
) -> None:
    """Report counts, unreadable files, duplicates, leakage, small images and imbalance.

    Exits with 1 when the data has errors that would break or bias training.
    """
    from visiontune.data.validate import check_data

    try:
        report = check_data(data, label_regex, val_fraction, test_fraction, seed, max_pixels, min_size)
    except UserError as exc:  # data that cannot even be listed is data with errors: exit 1, not 2
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    if near_duplicates:
        leaked = check_near_duplicates(
            data, features=features, model=model, run=run, weights=weights, pretrained=pretrained,
            image_size=image_size, duplicate_similarity=duplicate_similarity, device=device,
            label_regex=label_regex, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        if leaked:
            stdout.print(f"[yellow]warning:[/yellow] {leaked} near-duplicate pair(s) span splits; review them "
                         "(`visiontune audit` ranks them) and exclude the later copy with `train --exclude`")
    raise typer.Exit(1 if report.errors else 0)


RunArg = Annotated[Path, typer.Argument(help="A run directory written by `visiontune train`.")]
Device = Annotated[str, Opt(help="auto | cpu | cuda")]
Workers = Annotated[Optional[int], Opt(help="Decoding worker processes; default from free cores.")]
BatchSize = Annotated[int | None, Opt(help="Images per inference batch (default: chosen per device).")]
Backend = Annotated[str | None, Opt(help="torch | onnx (ONNX Runtime, CPU) | openvino (CPU) [default on a CPU: "
                                              "openvino, else onnx, where installed, else torch]")]
Precision = Annotated[str | None, Opt(help="fp32 | bf16 (OpenVINO, or torch autocast) [default: fp32 on CPU, bf16 "
                                                "on CUDA]")]
Quantize = Annotated[str | None, Opt(help="int8: ONNX Runtime static int8, calibrated on the run's training images.")]


@app.command()
def evaluate(
    run_dir: RunArg,
    split: Annotated[str, Opt(help="Split of the run to evaluate: test, val or train.")] = "test",
    data: Annotated[Optional[str], Opt(help="Evaluate another folder instead (classes matched by name).")] = None,
    target_recall: Annotated[Optional[float], Opt(help="Binary: choose on val the threshold reaching this recall; saved for predict.")] = None,
    positive: Annotated[Optional[str], Opt(help="Binary: the positive class (default: the second label).")] = None,
    temperature: Annotated[bool, Opt("--temperature", help="Fit temperature scaling on val; saved for predict.")] = False,
    top_n: Annotated[int, Opt(help="Images in the top-losses and best-predictions grids.")] = 8,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    backend: Backend = None,
    precision: Precision = None,
    quantize: Quantize = None,
    stress: Annotated[bool, Opt("--stress", help="Also measure accuracy under named perturbations (grayscale, invert, edges, blur, noise, jpeg, patch shuffle, masks) with 95% CIs.")] = False,
) -> None:
    """Metrics, confusion matrix, top losses, calibration (and ROC/PR for binary) in RUN/eval/."""
    run = visiontune.load_run(run_dir)
    result = run.evaluate(split, data, target_recall=target_recall, positive=positive, temperature=temperature,
                          top_n=top_n, batch_size=batch_size, workers=workers, device=device,
                          backend=backend, precision=precision, quantize=quantize, stress=stress)
    _print_metrics(result)
    if stress:
        _print_stress(result["stress"])
    stdout.print(f"written: {run.dir / 'eval' / result['name']} and {run.dir / 'report.html'}")


@app.command()
def predict(
    run_dir: RunArg,
    paths: Annotated[Optional[list[str]], typer.Argument(help="Image files or folders (searched recursively).")] = None,
    out: Annotated[Path, Opt(help="Output file: .csv or .jsonl.")] = Path("predictions.csv"),
    files: FilesList = None,
    shard: ShardSpec = None,
    top_k: Annotated[int, Opt(help="Also list the k most likely classes.")] = 1,
    tta: Annotated[bool, Opt("--tta", help="Average with the horizontally flipped image.")] = False,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    backend: Backend = None,
    precision: Precision = None,
    quantize: Quantize = None,
) -> None:
    """Label images with a trained run; unreadable files are listed, never fatal."""
    # not through `load_run`: its evaluate / explain imports (scikit-learn, matplotlib) cost ~0.7 s of start-up
    from visiontune.evaluation.predict import predict as predict_images
    from visiontune.models.classifier_run import ClassifierRun

    chosen = shards.resolve(shard)
    result = predict_images(
        ClassifierRun(run_dir), shards.inputs(paths, files), out=out, top_k=top_k, tta=tta, batch_size=batch_size,
        workers=workers, device=device, backend=backend, precision=precision, quantize=quantize, shard=chosen,
    )
    if result.shard is not None:
        shards.print_part(chosen, result.shard.part, result.shard.skipped_existing, out)
        if result.shard.skipped_existing or result.shard.inputs == 0:
            return
        out = result.shard.part
    if result.written or result.shard is not None:  # else no file was written: the error below says why
        stdout.print(f"{result.written} prediction(s) written to {out}")
    if result.skipped:
        err.print(f"[yellow]{len(result.skipped)} file(s) skipped[/yellow] (also in {out.with_name(out.stem + '.skipped.csv')}):")
        for row in result.skipped:
            err.print(f"  {row['path']}: {row['skipped']}", markup=False)
    require_some_read(result.written, len(result.skipped), "predicted")


@app.command()
def explain(
    run_dir: RunArg,
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    method: Annotated[str, Opt(help="gradcam (last convolutional stage) or lime.")] = "gradcam",
    target: Annotated[Optional[str], Opt(help="Class to explain (default: the predicted one).")] = None,
    out: Annotated[Optional[Path], Opt(help="Folder for the overlay PNGs (default RUN/explain).")] = None,
) -> None:
    """Overlay PNGs showing which regions drove each prediction."""

    records = visiontune.load_run(run_dir).explain(images, method=method, target=target, out_dir=out)
    skipped = sum("skipped" in record for record in records)
    for record in records:
        if "skipped" in record:
            err.print(f"skipped {record['path']}: {record['skipped']}", markup=False)
        else:
            stdout.print(
                f"{record['path']}: {record['label']} ({record['probability']:.2f}), explaining "
                f"{record['target']} -> {record['overlay']}", markup=False,
            )
    require_some_read(len(records) - skipped, skipped, "explained")


@app.command()
def report(run_dir: RunArg) -> None:
    """(Re)write RUN/report.html from what the run directory holds."""
    stdout.print(f"written: {visiontune.load_run(run_dir).report()}")


@app.command()
def demo(
    out_dir: Annotated[Path, Opt("--out", help="Where to write the demo data and run.")] = Path("runs/demo"),
) -> None:
    """Generate synthetic clean vs scratched surfaces, fine-tune a pretrained backbone on them (a small
    model from scratch when no pretrained weights can be had), and evaluate it."""
    from visiontune.demo import DEMO_OPTIONS, demo_options, make_scratch_dataset

    run_dir = out_dir / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already exists; pass another --out")
    data = make_scratch_dataset(out_dir / "data")
    stdout.print(f"demo data: {data} (clean vs scratched surfaces)")
    options, why_not = demo_options()
    if why_not:
        stdout.print(why_not)
    else:
        stdout.print(f"fine-tuning pretrained {options['model']}: one frozen epoch, then the whole network")
    try:
        run = visiontune.fit(data, out=str(run_dir), **options)
    except Exception as exc:  # the download failed after all: the from-scratch demo still runs
        if options is DEMO_OPTIONS or (run_dir / "checkpoints").exists():
            raise
        stdout.print(f"pretrained weights could not be loaded ({exc}); training from scratch instead", markup=False)
        run = visiontune.fit(data, out=str(run_dir), **DEMO_OPTIONS)
    _print_evaluation(run.summary)


def _print_report(report) -> None:
    splits = sorted({s for row in report.counts.values() for s in row}, key=("train", "val", "test", "unsplit").index)
    table = Table(title=f"{report.root} ({report.source})")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for label, row in report.counts.items():
        table.add_row(label, *(str(row.get(s, 0)) for s in splits), str(sum(row.values())))
    stdout.print(table)
    if report.imbalance_ratio:
        stdout.print(f"imbalance ratio (largest / smallest class): {report.imbalance_ratio:.2f}")
    sections = [
        ("unreadable files", [f"{s.path}: {s.reason}" for s in report.skipped]),
        ("duplicates across splits (leakage)", [", ".join(g) for g in report.cross_split_duplicates]),
        ("identical images", [", ".join(g) for g in report.duplicate_groups]),
        ("small images", [f"{s['path']} ({s['width']}x{s['height']})" for s in report.small_images]),
    ]
    for title, lines in sections:
        if lines:
            stdout.print(f"\n[bold]{title}[/bold] ({len(lines)})")
            for line in lines:
                stdout.print(f"  {line}", markup=False)
    for line in report.warnings:
        stdout.print(f"[yellow]warning:[/yellow] {line}")
    for line in report.errors:
        stdout.print(f"[red]error:[/red] {line}")
    if not report.errors:
        stdout.print("[green]no errors[/green]")


def _print_evaluation(summary: dict) -> None:
    table = Table(title="evaluation of the best checkpoint")
    for column in ("split", "images", "accuracy", "macro-F1", "loss"):
        table.add_column(column, justify="right")
    for split in ("val", "test"):
        if split in summary:
            metrics, n = summary[split], sum(summary["counts"][split].values())
            table.add_row(split, str(n), f"{metrics['accuracy']:.3f}", f"{metrics['f1_macro']:.3f}", f"{metrics['loss']:.4f}")
    stdout.print(table)


def _print_metrics(result: dict) -> None:
    table = Table(title=f"{result['name']}: {result['n']} images")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for label, row in result["per_class"].items():
        table.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    stdout.print(table)
    ci = result["bootstrap_95ci"]
    stdout.print(
        f"accuracy {result['accuracy']:.4f} (95% CI {ci['accuracy'][0]:.3f}-{ci['accuracy'][1]:.3f}), "
        f"macro-F1 {result['f1_macro']:.4f} (95% CI {ci['f1_macro'][0]:.3f}-{ci['f1_macro'][1]:.3f}), "
        f"ECE {result['calibration']['uncalibrated']['ece']:.4f}"
    )
    for pair in result["most_confused"][:5]:
        stdout.print(f"  {pair['actual']} -> {pair['predicted']}: {pair['count']}")
    threshold = result.get("binary", {}).get("threshold")
    if threshold:
        stdout.print(
            f"threshold {threshold['threshold']:.4f} for '{threshold['positive']}' (chosen on val for recall >= "
            f"{threshold['target_recall']}): precision {threshold['here']['precision']:.3f}, recall {threshold['here']['recall']:.3f}"
        )
    ood = result.get("ood")
    if ood:
        stdout.print(f"out of distribution: {ood['flagged']} of {ood['images']} images flagged ({ood['primary']} score "
                     f"above {ood['threshold']:.4g}, which keeps {ood['keep']:.0%} of validation)", markup=False)
        if "auroc" in ood:
            scores = ", ".join(f"{name} {value:.3f}" for name, value in ood["auroc"].items())
            stdout.print(f"OOD AUROC vs in-domain {result['in_domain']['split']}: {scores} (in-domain flagged "
                         f"{ood['reference_flagged_rate']:.1%})", markup=False)


def _print_stress(stress: dict) -> None:
    table = Table(title="accuracy under perturbation")
    for column in ("perturbation", "accuracy", "95% CI", "drop"):
        table.add_column(column, justify="left" if column == "perturbation" else "right")
    for row in stress["perturbations"]:
        table.add_row(row["name"], f"{row['accuracy']:.3f}", f"{row['ci'][0]:.3f}-{row['ci'][1]:.3f}", f"{row['drop']:+.3f}")
    stdout.print(table)
    stdout.print(stress["reading"], markup=False)


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=False)],
    )
    try:
        app()
    except UserError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; an unfinished run continues with: visiontune train --resume RUN_DIR")
        sys.exit(130)

if __name__ == "__main__":
    main()
