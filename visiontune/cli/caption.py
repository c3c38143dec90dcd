"""`visiontune caption train | predict | evaluate | scenes`: a thin layer over visiontune.caption."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visiontune.errors import UserError, require_some_read

caption_app = typer.Typer(
    help="Image captioning: a decoder over a frozen backbone's spatial features.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Opt = typer.Option
RunArg = Annotated[Path, typer.Argument(help="A caption run directory written by `visiontune caption train`.")]
Beam = Annotated[int, Opt(help="Beam width (1: greedy decoding).")]
Device = Annotated[str, Opt(help="auto | cpu | cuda")]


def _api():
    """visiontune.caption, or one message naming the extra when its libraries are not installed."""
    try:
        import pycocoevalcap  # noqa: F401
        import tokenizers  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError(f"captioning needs {exc.name}: pip install 'visiontune[caption]'") from None
    from visiontune import caption

    return caption


@caption_app.command()
def train(
    data: Annotated[Optional[str], typer.Argument(help="CSV of image,caption[,split] rows or a COCO captions JSON.",
                                                  show_default=False)] = None,
    resume: Annotated[Optional[Path], Opt(help="Continue an interrupted caption run directory.")] = None,
    out: Annotated[Optional[str], Opt(help="Run directory [default: runs/<time>-caption-<model>].")] = None,
    model: Annotated[Optional[str], Opt(help="Any timm CNN name (the frozen encoder) [default: resnet50].")] = None,
    weights: Annotated[Optional[str], Opt(help="Local encoder weights (safetensors or state dict).")] = None,
    pretrained: Annotated[Optional[bool], Opt("--pretrained/--no-pretrained", help="Pretrained encoder.")] = None,
    image_size: Annotated[Optional[int], Opt(help="Input size [default: the model's].")] = None,
    features: Annotated[Optional[str], Opt(help="grid | pooled | multi [default: grid].")] = None,
    layers: Annotated[Optional[str], Opt(help="Comma-separated encoder layers, e.g. layer3,layer4 "
                                              "[default: the last; multi: the last two].")] = None,
    decoder: Annotated[Optional[str], Opt(help="transformer | lstm [default: transformer].")] = None,
    width: Annotated[Optional[int], Opt(help="Decoder width [default: 256].")] = None,
    decoder_layers: Annotated[Optional[int], Opt(help="Transformer decoder layers [default: 2].")] = None,
    heads: Annotated[Optional[int], Opt(help="Attention heads [default: 4].")] = None,
    epochs: Annotated[Optional[int], Opt(help="Most epochs [default: 30].")] = None,
    patience: Annotated[Optional[int], Opt(help="Epochs without a better validation score before stopping "
                                                "[default: 5].")] = None,
    monitor: Annotated[Optional[str], Opt(help="cider | bleu4 [default: cider].")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Captions per step [default: 64].")] = None,
    lr: Annotated[Optional[float], Opt(help="Peak learning rate [default: 5e-4].")] = None,
    label_smoothing: Annotated[Optional[float], Opt(help="Label smoothing [default: 0.1].")] = None,
    max_length: Annotated[Optional[int], Opt(help="Longest caption in tokens [default: 32].")] = None,
    beam: Annotated[Optional[int], Opt(help="Beam width of the final test evaluation [default: 3].")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of the split, init and batch order [default: 0].")] = None,
    workers: Annotated[Optional[int], Opt(help="Image loading processes.")] = None,
    device: Annotated[Optional[str], Opt(help="auto | cpu | cuda")] = None,
    report: Annotated[Optional[bool], Opt("--report/--no-report", help="Write the test report.")] = None,
) -> None:
    """Train a captioner: features cached once, decoder trained with teacher forcing, the epoch with
    the best validation CIDEr-D kept, the test split scored once at the end."""
    caption = _api()
    options = dict(out=out, model=model, weights=weights, pretrained=pretrained, image_size=image_size,
                   features=features, layers=layers.split(",") if layers else None, decoder=decoder, width=width,
                   decoder_layers=decoder_layers, heads=heads, epochs=epochs, patience=patience, monitor=monitor,
                   batch_size=batch_size, lr=lr, label_smoothing=label_smoothing, max_length=max_length, beam=beam,
                   seed=seed, workers=workers, device=device, report=report)
    if resume is not None:
        if data is not None or any(v is not None for v in options.values()):
            raise UserError("--resume continues a run with its own config.yaml; give no data or other options")
        run = caption.fit(resume=resume)
    else:
        if data is None:
            raise UserError("give the captions file (CSV or COCO JSON), or --resume RUN")
        run = caption.fit(data, **{name: value for name, value in options.items() if value is not None})
    summary = json.loads((run.dir / "summary.json").read_text())
    stdout.print(f"kept epoch {summary['best_epoch']} of {summary['epochs_run']} (val {summary['monitor']} "
                 f"{summary['val_' + summary['monitor']]:.3f}); run: {escape(str(run.dir))}")
    if "test" in summary:
        _print_metrics(summary["test"], "test")


@caption_app.command()
def predict(
    run_dir: RunArg,
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    out: Annotated[Path, Opt(help="CSV to write: image,caption,score.")] = Path("captions.csv"),
    beam: Beam = 3,
    device: Device = "auto",
) -> None:
    """Caption images (beam search with a length penalty, batched)."""
    from visiontune.io import write_csv_atomic

    caption = _api()

    captions, skipped = caption.load(run_dir).predict(images, beam=beam, device=device)
    for path, reason in skipped:
        err.print(f"[yellow]skipped[/yellow] {escape(path)}: {escape(reason)}")
    require_some_read(len(captions), len(skipped), "captioned")
    write_csv_atomic(out, ["image", "caption", "score"],
                     [{"image": c.image, "caption": c.caption, "score": round(c.score, 4)} for c in captions])
    for c in captions[:10]:
        stdout.print(f"{c.image}: {c.caption}", markup=False)
    stdout.print(f"{len(captions)} captions written to {out}", markup=False)


@caption_app.command()
def evaluate(
    run_dir: RunArg,
    split: Annotated[str, Opt(help="test | val | train (val and train numbers are optimistic).")] = "test",
    beam: Beam = 3,
    device: Device = "auto",
) -> None:
    """BLEU-1..4, ROUGE-L and CIDEr-D with 95% bootstrap CIs, per-image scores and an HTML report
    with the best and worst captions and attention maps (RUN/eval/SPLIT/)."""
    caption = _api()
    result = caption.load(run_dir).evaluate(split, beam=beam, device=device)
    _print_metrics(result["metrics"], f"{split}: {result['images']} images")
    stdout.print(f"written to {escape(str(Path(run_dir) / 'eval' / split))}/ (metrics.json, captions.csv, report.html)")


@caption_app.command()
def scenes(
    out: Annotated[Path, typer.Argument(help="Folder to write images/, captions.csv and scenes.json into.")],
    train: Annotated[int, Opt(help="Training images.")] = 2000,
    val: Annotated[int, Opt(help="Validation images.")] = 300,
    test: Annotated[int, Opt(help="Test images.")] = 300,
    image_size: Annotated[int, Opt(help="Image side in pixels.")] = 128,
    seed: Annotated[int, Opt(help="Seed of the scenes.")] = 0,
) -> None:
    """Demo data: scenes of 1-3 coloured shapes with three true captions each, spatial relations included."""
    caption = _api()
    path = caption.make_scenes(out, {"train": train, "val": val, "test": test}, image_size=image_size, seed=seed)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    stdout.print(f"{train + val + test} images, {rows} captions: {escape(str(path))}")


def _print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("metric", "value", "95% CI"):
        table.add_column(column, justify="right")
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        low, high = metrics[name]["ci95"]
        table.add_row(name, f"{metrics[name]['value']:.3f}", f"{low:.3f}-{high:.3f}")
    stdout.print(table)
