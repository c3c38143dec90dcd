"""`visiontune detect fit | predict | evaluate | tiles`: a thin layer over visiontune.detect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visiontune.errors import UserError

detect_app = typer.Typer(
    help="Object detection: Faster R-CNN or R-CNN regions on a fine-tuned backbone.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Opt = typer.Option
RunArg = Annotated[Path, typer.Argument(help="A detector run directory written by `visiontune detect fit`.")]


def _api():
    """visiontune.detect, or one message naming the extra when its libraries are not installed."""
    try:
        import defusedxml  # noqa: F401
        import pycocotools  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError(f"detection needs {exc.name}: pip install 'visiontune[detect]'") from None
    from visiontune import detect

    return detect


def _options(model_class, **given):
    """The method's options model from the flags that were given, or one line naming the bad one."""
    from pydantic import ValidationError

    try:
        return model_class(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise UserError(f"--{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}") from None


def _ratios(text: str | None) -> tuple[float, ...] | None:
    """'0.25,0.5,1' -> (0.25, 0.5, 1.0); not numbers is one message (the options model checks the values)."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--anchor-ratios: {text!r} is not a comma-separated list of numbers") from None


@detect_app.command()
def fit(
    images: Annotated[Path, typer.Argument(help="The image folder the annotations refer to.")],
    boxes: Annotated[Path, Opt(help="Annotations: a COCO JSON file, or a folder of VOC .xml, YOLO .txt or masks.")],
    out: Annotated[Optional[str], Opt(help="Run directory [default: runs/<time>-detect-<method>].")] = None,
    format: Annotated[str, Opt("--format", help="auto | coco | voc | yolo | masks")] = "auto",
    classes: Annotated[Optional[str], Opt(help="Comma-separated class names, fixing their order (YOLO without "
                                               "classes.txt; others are listed as problems).")] = None,
    method: Annotated[str, Opt(help="faster-rcnn | rcnn")] = "faster-rcnn",
    target_recall: Annotated[float, Opt(help="Recall at IoU 0.5 the score threshold must reach on validation.")] = 0.9,
    min_area: Annotated[float, Opt(help="Mask components with fewer pixels are dropped.")] = 1.0,
    seed: Annotated[int, Opt(help="Seed of the split and of training.")] = 0,
    epochs: Annotated[Optional[int], Opt(help="faster-rcnn: most epochs [default: 12].")] = None,
    model: Annotated[Optional[str], Opt(help="faster-rcnn: timm backbone [default: tf_efficientnet_lite0].")] = None,
    arch: Annotated[Optional[str], Opt(help="faster-rcnn: timm-fpn | fasterrcnn_resnet50_fpn_v2 [default: timm-fpn].")] = None,
    weights: Annotated[Optional[str], Opt(help="faster-rcnn: backbone weights, a file or a classifier run.")] = None,
    pretrained: Annotated[Optional[bool], Opt("--pretrained/--no-pretrained", help="faster-rcnn: pretrained backbone.")] = None,
    batch_size: Annotated[Optional[int], Opt(help="faster-rcnn: images per step [default: 4].")] = None,
    lr: Annotated[Optional[float], Opt(help="faster-rcnn: peak learning rate [default: 0.01 SGD, 1e-3 AdamW].")] = None,
    optimizer: Annotated[Optional[str], Opt(help="faster-rcnn: sgd | adamw [default: sgd].")] = None,
    min_size: Annotated[Optional[int], Opt(help="faster-rcnn: shorter image side in the network [default: 320].")] = None,
    max_size: Annotated[Optional[int], Opt(help="faster-rcnn: longest image side in the network [default: 512].")] = None,
    hflip: Annotated[Optional[bool], Opt("--hflip/--no-hflip", help="faster-rcnn: random horizontal flips.")] = None,
    anchor_ratios: Annotated[Optional[str], Opt(help="faster-rcnn: anchor height/width ratios, e.g. 0.25,0.5,1,2,4 "
                                                     "for long thin objects [default: 0.5,1,2].")] = None,
    patience: Annotated[Optional[int], Opt(help="faster-rcnn: epochs without a better val mAP before stopping.")] = None,
    device: Annotated[Optional[str], Opt(help="faster-rcnn: auto | cpu | cuda")] = None,
    classifier: Annotated[Optional[Path], Opt(help="rcnn: a visiontune classifier run fine-tuned on regions.")] = None,
    svm: Annotated[Optional[bool], Opt("--svm/--no-svm", help="rcnn: linear SVMs on the region features.")] = None,
    box_regression: Annotated[Optional[bool], Opt("--box-regression/--no-box-regression",
                                                  help="rcnn: refine boxes by regression.")] = None,
    max_proposals: Annotated[Optional[int], Opt(help="rcnn: proposals per image [default: 300].")] = None,
    proposals: Annotated[Optional[str], Opt(help="rcnn: fast | quality | sliding")] = None,
    search_side: Annotated[Optional[int], Opt(help="rcnn: selective search's longer image side [default: 512].")] = None,
    report: Annotated[bool, Opt("--report/--no-report", help="Write the test report.")] = True,
) -> None:
    """Fit a detector: the score threshold chosen on validation for --target-recall, the test split
    scored once at the end (RUN/eval/test/)."""
    detect = _api()
    faster, regions = None, None
    frcnn_flags = dict(epochs=epochs, model=model, arch=arch, weights=weights, pretrained=pretrained,
                       batch_size=batch_size, lr=lr, optimizer=optimizer, min_size=min_size, max_size=max_size,
                       hflip=hflip, patience=patience, device=device, anchor_ratios=_ratios(anchor_ratios))
    if method == "rcnn":
        from visiontune.detect.rcnn import RCNNOptions

        given = sorted(name for name, value in frcnn_flags.items() if value is not None)
        if given:
            raise UserError(f"{', '.join('--' + n.replace('_', '-') for n in given)}: Faster R-CNN options, "
                            "not for --method rcnn")

        regions = _options(RCNNOptions, classifier_run=classifier, svm=svm, box_regression=box_regression,
                           max_proposals=max_proposals, proposals=proposals, search_side=search_side)
    elif classifier is not None or any(v is not None for v in (svm, box_regression, max_proposals, proposals,
                                                               search_side)):
        raise UserError("--classifier, --svm, --box-regression, --max-proposals, --proposals and --search-side "
                        "are for --method rcnn")
    else:
        from visiontune.detect.faster_rcnn import FasterRCNNOptions

        faster = _options(FasterRCNNOptions, **frcnn_flags, seed=seed)
    run = detect.fit(boxes, images, out, method=method, fmt=format, target_recall=target_recall, seed=seed,
                     min_area=min_area, classes=[c.strip() for c in classes.split(",")] if classes else None,
                     faster_rcnn=faster, rcnn=regions, report=report)
    summary = json.loads((run.dir / "summary.json").read_text())
    chosen = summary["threshold"]
    problems = summary["annotation_problems"]
    if problems:
        err.print(f"[yellow]{len(problems)} annotation problem(s)[/yellow], listed in {escape(str(run.dir))}/summary.json")
    stdout.print(f"threshold {chosen['value']:.3f} (val recall {chosen['val_recall']:.3f} for target "
                 f"{chosen['target_recall']}); run: {escape(str(run.dir))}")
    if "test" in summary:
        _print_metrics(summary["test"], "test")


@detect_app.command()
def predict(
    run_dir: RunArg,
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    out: Annotated[Path, Opt(help="CSV to write: image,label,score,x1,y1,x2,y2.")] = Path("preds.csv"),
    score_threshold: Annotated[Optional[float], Opt(help="Keep boxes scoring at least this [default: the run's].")] = None,
) -> None:
    """Boxes on new images, at the run's score threshold, after per-class NMS."""
    from visiontune.io import write_csv_atomic

    detect = _api()
    rows, skipped = detect.load(run_dir).predict(images, score_threshold=score_threshold)
    for path, reason in skipped:
        err.print(f"[yellow]skipped[/yellow] {escape(path)}: {escape(reason)}")
    write_csv_atomic(out, ["image", "label", "score", "x1", "y1", "x2", "y2"], rows)
    stdout.print(f"{len(rows)} boxes written to {out}", markup=False)


@detect_app.command()
def evaluate(
    run_dir: RunArg,
    split: Annotated[str, Opt(help="test | val | train (val and train numbers are optimistic).")] = "test",
    boxes: Annotated[Optional[Path], Opt(help="Evaluate on these annotations instead of a split.")] = None,
    images: Annotated[Optional[Path], Opt(help="The image folder of --boxes.")] = None,
    format: Annotated[str, Opt("--format", help="auto | coco | voc | yolo | masks")] = "auto",
) -> None:
    """mAP@0.5 with a 95% bootstrap CI, mAP@[.5:.95], per-class AP, recall and precision at the
    run's threshold, PR curves and the worst images (RUN/eval/SPLIT/)."""
    detect = _api()
    result = detect.load(run_dir).evaluate(split, annotations=boxes, images=images, fmt=format)
    _print_metrics(result["metrics"] | {"images_per_second": result["images_per_second"]},
                   f"{result['split']}: {result['images']} images")
    stdout.print(f"written to {escape(str(Path(run_dir) / 'eval' / result['split']))}/ (metrics.json, report.html)")


@detect_app.command()
def tiles(
    out: Annotated[Path, typer.Argument(help="Folder to write images/ and annotations.json (COCO) into.")],
    images: Annotated[int, Opt("--images", help="Tiles to generate.")] = 400,
    size: Annotated[int, Opt(help="Tile side in pixels.")] = 512,
    seed: Annotated[int, Opt(help="Seed of the tiles.")] = 0,
    formats: Annotated[Optional[str], Opt(help="Also write these formats, comma-separated: voc,yolo,masks.")] = None,
) -> None:
    """Demo data: textured grey tiles with cracks and blobs, and their boxes."""
    detect = _api()
    path = detect.make_tiles(out, images, size=size, seed=seed,
                             formats=tuple(f.strip() for f in formats.split(",")) if formats else ())
    stdout.print(f"{images} tiles: {escape(str(path))}")


def _print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    low, high = metrics["map_50"]["ci95"]
    table.add_row("mAP@0.5", f"{metrics['map_50']['value']:.3f} (95% CI {low:.3f}-{high:.3f})")
    table.add_row("mAP@[.5:.95]", f"{metrics['map']:.3f}")
    for name, row in metrics["per_class"].items():
        table.add_row(f"AP@0.5 {escape(name)}", "-" if row["ap_50"] is None else f"{row['ap_50']:.3f}")
    table.add_row("recall at threshold", f"{metrics['recall_at_threshold']:.3f}")
    table.add_row("precision at threshold", f"{metrics['precision_at_threshold']:.3f}")
    if metrics.get("images_per_second"):
        table.add_row("images/s", f"{metrics['images_per_second']:.2f}")
    stdout.print(table)
