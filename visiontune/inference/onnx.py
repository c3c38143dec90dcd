"""ONNX export of a run's model and ONNX Runtime inference, fp32 or int8.

On a small CPU, ONNX Runtime's fused kernels beat eager PyTorch, and int8 (static, QDQ,
per-channel weights, activations calibrated on the run's own training images) uses the VNNI
instructions for a further speed-up at a small, measured accuracy cost. Dynamic quantization is
not offered: it leaves convolutions in float, where a CNN spends its time.

Exported files are cached in RUN/export/ next to a JSON key of the checkpoint they came from
(size, mtime and SHA-256), so a retrained or replaced checkpoint is exported again.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.errors import UserError
from visiontune.io import atomic_write, write_text_atomic
from visiontune.models.penultimate import LogitsAndFeatures

QUANTIZE = (None, "int8")
INPUT, OUTPUT, FEATURES = "images", "logits", "features"
RUN_OUTPUTS = [OUTPUT, FEATURES]  # a run's graph: the logits and the features they come from (for OOD scores)


def require_onnxruntime() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("the ONNX backend needs onnx and onnxruntime: pip install 'visiontune[onnx]'") from None


def export_model(model: nn.Module, path: str | Path, image_size: int, outputs: Sequence[str] = (OUTPUT,)) -> Path:
    """Write `model` (eval mode, CPU, fp32) as ONNX with a dynamic batch axis, atomically; `outputs`
    names its outputs (a classifier's one `logits`, an anomaly graph's scores and maps)."""
    require_onnxruntime()
    path = Path(path)
    model = model.float().eval().cpu()
    example = torch.zeros(1, 3, image_size, image_size)

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, input_names=[INPUT], output_names=list(outputs),
                dynamic_axes={name: {0: "batch"} for name in (INPUT, *outputs)}, opset_version=17,
            )

    atomic_write(path, write)
    return path


def quantize_int8(fp32_path: str | Path, path: str | Path, calibration: Iterator[np.ndarray]) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on `calibration` batches."""
    require_onnxruntime()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            batch = next(calibration, None)
            return None if batch is None else {INPUT: batch}

    path = Path(path)
    prepared = path.with_name(path.stem + ".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        atomic_write(path, lambda tmp: quantize_static(
            str(prepared), tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        ))
    finally:
        prepared.unlink(missing_ok=True)
    return path


class OnnxModel:
    """Callable like an eval-mode module: a float NCHW CPU tensor in, logits out (and, from a run's
    graph, the penultimate features too: `logits_and_features`).

    `spin=False` lets idle intra-op threads sleep instead of busy-waiting for the next batch: for
    a server, which waits between requests and decodes on the same cores (same latency and 5%
    more throughput on 2 cores, a third less CPU: docs/benchmarks.md, "Serving").
    """

    def __init__(self, path: str | Path, threads: int = 1, spin: bool = True) -> None:
        require_onnxruntime()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: input_array(images)})[0])

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session.run(RUN_OUTPUTS, {INPUT: input_array(images)})
        return torch.from_numpy(logits), torch.from_numpy(features)


def input_array(images: torch.Tensor) -> np.ndarray:
    """A batch as the exported graphs take it: float32, contiguous, on the CPU. A uint8 batch stays
    uint8, for a graph that normalises it (`OpenVinoModel.takes_uint8`); others refuse it."""
    images = images.detach().cpu()
    return np.ascontiguousarray((images if images.dtype == torch.uint8 else images.float()).numpy())


def export_run(run, quantize: str | None = None, calibration_images: int = 256, seed: int = 0) -> Path:
    """RUN/export/model.onnx (or model.int8.onnx), exported only when the checkpoint changed.

    The graph has two outputs, `logits` and `features` (RUN_OUTPUTS).
    """
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be int8 (or not given), not {quantize!r}")
    checkpoint = run.checkpoint_path("best")
    key = checkpoint_key(checkpoint)
    out = run.dir / "export" / ("model.int8.onnx" if quantize else "model.onnx")
    if is_current(out, key, outputs=RUN_OUTPUTS):
        return out
    size = run.preprocessing.input_size
    if quantize is None:
        export_model(LogitsAndFeatures(run.load_model("best")), out, size, RUN_OUTPUTS)
    else:
        fp32 = export_run(run, None)
        paths = _calibration_paths(run, calibration_images, seed)
        quantize_int8(fp32, out, calibration_batches(paths, run.preprocessing.eval_transform(), run.config.max_pixels))
    write_key(out, key, outputs=RUN_OUTPUTS, quantize=quantize,
              calibration_images=calibration_images if quantize else 0)
    return out


def calibration_batches(paths: Sequence[str], transform, max_pixels: int, batch_size: int = 16) -> Iterator[np.ndarray]:
    """Preprocessed float32 NCHW batches of the readable images among `paths`."""

    batch: list[np.ndarray] = []
    for path in paths:
        try:
            batch.append(transform(load_rgb(path, max_pixels)).numpy())
        except ImageLoadError:
            continue
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def _calibration_paths(run, n: int, seed: int) -> list[str]:
    """A seeded sample of the run's training images (val and test stay unseen by calibration)."""
    paths = [str(path) for path in run.split_paths("train")]
    if not paths:
        raise UserError(f"{run.dir}/splits.csv lists no training images to calibrate int8 quantization on")
    random.Random(seed).shuffle(paths)
    return paths[:n]


def checkpoint_key(path: Path) -> dict:
    """Size, mtime and SHA-256 of the file an export came from: the cache key of RUN/export/."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def is_current(out: Path, key: dict, **details) -> bool:
    """`out` exists and was exported from the checkpoint with `key` (see `write_key`), with the
    given `details` (an export made before a detail existed is made again)."""
    key_file = out.with_name(out.name + ".json")
    try:
        written = json.loads(key_file.read_text())
        return out.is_file() and written.get("checkpoint") == key and all(
            written.get(name) == value for name, value in details.items())
    except (OSError, ValueError):  # no key file, or a damaged one: export again
        return False


def write_key(out: Path, key: dict, **details) -> None:
    """OUT.json beside an exported file: the checkpoint key it came from, and how it was made."""
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps({"checkpoint": key, **details}, indent=2))
