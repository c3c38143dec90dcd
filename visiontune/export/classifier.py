"""A classifier run exported as ONNX, TorchScript or a Triton repository, and checked.

ONNX (fp32 or static int8) is `visiontune.inference.onnx`'s cached RUN/export/model[.int8].onnx,
the same file `predict --backend onnx` runs. TorchScript is a trace of the eval-mode fp32 CPU
model, cached in RUN/export/ under the same checkpoint key. Triton serves the ONNX file
(triton.py). Whatever the format, the file is checked against the eager model (check.py) before it
is reported written; `--out` copies the checked file elsewhere.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from visiontune.errors import UserError
from visiontune.export.check import check_export, copy_checked
from visiontune.export.triton import write_repository
from visiontune.inference.onnx import (
    QUANTIZE,
    OnnxModel,
    checkpoint_key,
    export_run,
    is_current,
    write_key,
)
from visiontune.io import atomic_write
from visiontune.models.classifier_run import ClassifierRun

FORMATS = ("onnx", "torchscript", "triton")
TORCHSCRIPT_FILE = "model.torchscript.pt"


@dataclass
class Exported:
    path: Path  # the exported file, or the Triton model directory
    check: dict  # what OUT.check.json holds


def check_options(format: str, quantize: str | None = None, name: str | None = None) -> None:
    """One UserError for a format, quantization or name that cannot go together."""
    if format not in FORMATS:
        close = difflib.get_close_matches(format, FORMATS, n=1)
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}"
                        + (f"; did you mean {close[0]}?" if close else ""))
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be int8 (or not given), not {quantize!r}")
    if quantize and format == "torchscript":
        raise UserError("--quantize int8 is ONNX Runtime's static quantization: use it with --format onnx or "
                        "triton; TorchScript exports the fp32 model")
    if name is not None and format != "triton":
        raise UserError("--name names the model in a Triton repository: use it with --format triton")


def export(run: ClassifierRun, format: str = "onnx", quantize: str | None = None, out: str | Path | None = None,
           name: str | None = None) -> Exported:
    """Export the run's best checkpoint as `format`, check it, and place it (see the module doc)."""
    check_options(format, quantize, name)
    if format == "torchscript":
        path = export_torchscript(run)
        forward = load_torchscript(path)
    else:
        path = export_run(run, quantize)
        forward = OnnxModel(path)
    check = check_export(run, path, forward, quantized=quantize is not None)
    if format == "triton":
        return Exported(write_repository(run, path, check, Path(out) if out else run.dir / "export" / "triton", name),
                        check)
    if out is not None:
        out = Path(out)
        path = copy_checked(path, out / path.name if out.is_dir() else out, check)
    return Exported(path, check)


def export_torchscript(run: ClassifierRun) -> Path:
    """RUN/export/model.torchscript.pt, traced again only when the checkpoint changed."""
    key = checkpoint_key(run.checkpoint_path("best"))
    out = run.dir / "export" / TORCHSCRIPT_FILE
    if is_current(out, key):
        return out
    model = run.load_model("best").float().eval()
    size = run.preprocessing.input_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice: TorchScript still loads in libtorch
        traced = torch.jit.trace(model, torch.zeros(1, 3, size, size), check_trace=False)
        atomic_write(out, lambda tmp: torch.jit.save(traced, tmp))
    write_key(out, key)
    return out


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")
