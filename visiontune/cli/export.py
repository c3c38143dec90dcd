"""`visiontune export`: a thin layer over visiontune.export (classifier runs) and
visiontune.anomaly.export (anomaly models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import visiontune
from visiontune.errors import UserError

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `visiontune train`, or an anomaly "
                                                 "model directory.")],
    format: Annotated[str, Opt("--format", help="onnx | torchscript | triton (a Triton model repository).")] = "onnx",
    quantize: Annotated[str | None, Opt(help="int8: ONNX Runtime static quantization calibrated on the run's "
                                             "training images (onnx, triton).")] = None,
    out: Annotated[Path | None, Opt(help="onnx, torchscript: also copy the checked file here (a file or a "
                                         "folder); triton: the model repository [default: RUN/export/triton].")] = None,
    name: Annotated[str | None, Opt(help="triton: the model's name [default: the run folder's name, "
                                         "letters, digits, _ and - kept].")] = None,
) -> None:
    """Export the best model, checked against eager torch on the run's own images (cached in RUN/export/,
    redone when the checkpoint changes)."""
    from visiontune.export.classifier import check_options
    from visiontune.export.classifier import export as export_run
    from visiontune.runformat import WrongArtifactError

    check_options(format, quantize, name)
    try:
        run = visiontune.load_run(run_dir)
    except WrongArtifactError:  # an anomaly model: its own graph, ONNX only
        _export_anomaly(run_dir, format, quantize, out, name)
        return
    result = export_run(run, format, quantize, out, name)
    check = result.check
    stdout.print(f"written: {result.path}", markup=False)
    stdout.print(f"checked on {check['images']} {check['inputs']} against {check['reference']}: max |logit "
                 f"difference| {check['max_abs_diff']:.3g}, argmax agreement {check['argmax_agreement']:.3f}",
                 markup=False)
    if format == "triton":
        repository = result.path.parent
        stdout.print(f"serve with: tritonserver --model-repository {repository.resolve()} (the client's "
                     f"preprocessing, temperature and threshold: {repository / 'README.md'})", markup=False)


def _export_anomaly(directory: Path, format: str, quantize: str | None, out: Path | None, name: str | None) -> None:
    from visiontune.anomaly.export import client_steps, export_onnx
    from visiontune.export.check import copy_checked

    if format != "onnx" or quantize or name:
        raise UserError(f"{directory} is an anomaly model: it exports as --format onnx only, without --quantize "
                        f"or --name")
    path, check, model = export_onnx(directory)
    if out is not None:
        path = copy_checked(path, out / path.name if out.is_dir() else out, check)
    size = model.image_size
    stdout.print(f"written: {path}", markup=False)
    stdout.print(f"exported: backbone, {model.detector.method} patch scores, map smoothing and the "
                 f"{model.scoring.image_score} image score in one graph: images [N, 3, {size}, {size}] -> scores "
                 f"[N], maps [N, {size}, {size}]", markup=False)
    stdout.print(f"checked on {check['images']} {check['inputs']} against {check['reference']}: max |difference| "
                 f"{check['max_abs_diff_scores']:.3g} (scores), {check['max_abs_diff_maps']:.3g} (maps)", markup=False)
    stdout.print("not in the graph, for the caller to do:", markup=False)
    for step in client_steps(model):
        stdout.print(f"  {step}", markup=False)
