"""Batched inference over image files with bounded memory: decode in workers, stream results.

Results come out batch by batch, so memory does not grow with the number of images; unreadable
files come out with their reason instead of stopping the stream.

How it runs is an `InferencePlan`, chosen per device (`plan_inference`): on a CPU, where compute
dominates and large batches fall out of cache, small batches of the exported ONNX graph through
OpenVINO where it is installed, else ONNX Runtime (fp32, same predictions, faster than eager
torch; torch channels-last without either) on the free cores, with one decoding worker overlapping
the model; on CUDA, large bf16 channels-last batches from pinned
memory. Every choice can be overridden, and `visiontune benchmark` shows the plan it measured.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.batches import iter_image_batches
from visiontune.data.dataset import default_workers
from visiontune.data.transforms import Preprocessing
from visiontune.devices import plan_cpu
from visiontune.errors import UserError
from visiontune.inference.onnx import OnnxModel, export_run
from visiontune.inference.openvino import OpenVinoModel
from visiontune.models.penultimate import logits_and_features

log = logging.getLogger(__name__)


@dataclass
class PredictedBatch:
    paths: list[str]
    logits: np.ndarray  # (len(paths), n_classes), float32
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    features: np.ndarray | None = None  # (len(paths), dim) penultimate features, when asked for


BACKENDS = ("torch", "onnx", "openvino")
GRAPH_BACKENDS = ("onnx", "openvino")  # run the exported ONNX file, on the CPU
PRECISIONS = ("fp32", "bf16")
CPU_BATCH, CUDA_BATCH = 8, 64  # measured: docs/benchmarks.md, "Fast inference"


@dataclass(frozen=True)
class InferencePlan:
    device: str  # "cpu" or "cuda"
    batch_size: int
    channels_last: bool
    precision: str  # fp32 | bf16 (autocast)
    backend: str  # torch | onnx
    quantize: str | None  # None | int8 (onnx only)
    threads: int  # torch / ONNX Runtime intra-op threads (CPU)
    workers: int  # decoding worker processes

    def describe(self) -> str:
        kind = "onnx int8" if self.quantize else f"{self.backend} {self.precision}"
        return (f"{self.device}: {kind}, batch {self.batch_size}, "
                f"{'channels_last' if self.channels_last else 'NCHW'}, {self.threads} thread(s), "
                f"{self.workers} decode worker(s)")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_inference(
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    precision: str | None = None,
    backend: str | None = None,
    quantize: str | None = None,
    threads: int | None = None,
    workers: int | None = None,
) -> InferencePlan:
    """The plan for `device`; options given explicitly are kept, the rest chosen for the device."""
    device = torch.device(device)
    if backend not in (None, *BACKENDS):
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision not in (None, *PRECISIONS):
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize must be int8 (or not given), not {quantize!r}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if quantize and backend not in (None, "onnx"):
        raise UserError("--quantize int8 runs in ONNX Runtime: use --backend onnx or leave --backend out")
    if quantize:
        backend = "onnx"
    elif backend is None:  # on a CPU: OpenVINO, then ONNX Runtime, where installed (faster than torch)
        backend = _default_cpu_backend(precision) if device.type == "cpu" else "torch"
    if backend in GRAPH_BACKENDS and device.type != "cpu":
        raise UserError(f"--backend {backend} runs on the CPU; use --device cpu")
    if backend == "onnx" and precision == "bf16":
        raise UserError("--precision bf16 applies to --backend torch or openvino")
    if device.type == "cuda":
        return InferencePlan("cuda", batch_size or CUDA_BATCH, True, precision or "bf16", backend, quantize,
                             torch.get_num_threads(), default_workers() if workers is None else workers)
    cpu = plan_cpu(threads, workers, overlap_decode=True)
    return InferencePlan("cpu", batch_size or CPU_BATCH, backend == "torch", precision or "fp32", backend,
                         quantize, cpu.threads, cpu.workers)


def onnx_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def openvino_available() -> bool:
    return onnx_available() and importlib.util.find_spec("openvino") is not None  # it compiles the ONNX export


def _default_cpu_backend(precision: str | None) -> str:
    if openvino_available():
        return "openvino"
    return "onnx" if precision != "bf16" and onnx_available() else "torch"


def load_for_inference(run, plan: InferencePlan, fallback: bool = False, spin: bool = True
                       ) -> tuple[object, InferencePlan]:
    """The run's best model ready for `plan`: an nn.Module, an ONNX Runtime or an OpenVINO model of
    the checked ONNX export, and the plan.

    With `fallback` (the backend was chosen automatically), an export OpenVINO cannot compile runs in
    ONNX Runtime (fp32), and a model the exporter cannot handle in torch, each with a warning, and
    the returned plan says so. `spin` as in `OnnxModel`.
    """
    if plan.backend in GRAPH_BACKENDS:
        try:
            path = export_run(run, plan.quantize)
            if plan.backend == "openvino":
                try:
                    normalization = (run.preprocessing.mean, run.preprocessing.std)
                    return OpenVinoModel(path, plan.threads, plan.precision, normalization), plan
                except Exception as exc:  # the export is fine: ONNX Runtime runs it (not in bf16)
                    if not fallback or isinstance(exc, UserError) or plan.precision == "bf16" or not onnx_available():
                        raise
                    log.warning("OpenVINO could not compile the ONNX export (%s); running it in ONNX Runtime",
                                str(exc).splitlines()[0][:200])
                    plan = replace(plan, backend="onnx")
            return OnnxModel(path, plan.threads, spin), plan
        except Exception as exc:
            if not fallback or isinstance(exc, UserError):
                raise
            log.warning("the ONNX export could not run in %s (%s); running in torch instead", plan.backend,
                        str(exc).splitlines()[0][:200])
            plan = replace(plan, backend="torch", channels_last=True)
    return run.load_model("best"), plan


def iter_logits(
    model,
    transform,
    paths: Sequence[str],
    batch_size: int | None = None,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tta: bool = False,
    device: str | torch.device = "cpu",
    plan: InferencePlan | None = None,
    features: bool = False,
    draft_size: int | None = None,
    preprocessing: Preprocessing | None = None,
) -> Iterator[PredictedBatch]:
    """Logits for `paths` in order, batch by batch; `tta` averages with the horizontal flip;
    `features` adds the penultimate features (for out-of-distribution scores). `draft_size`:
    the transform's resize target, for JPEG draft decoding (`ImageFiles`; None decodes exactly).
    With `preprocessing` (the transform's own) on CUDA, JPEGs are decoded, resized and normalised
    on the GPU (`data.jpeg_batches`, untested on a GPU) and `transform` is not used; on a CPU with
    a model that normalises uint8 batches itself (`OpenVinoModel.takes_uint8`), the workers stop
    at uint8 (`preprocessing.eval_transform(normalize=False)`) instead of `transform`.

    `model` is an nn.Module or a callable from tensors to logits (`OnnxModel`); without `plan`,
    one is chosen for `device` (batch size and workers as given).
    """
    if plan is None:
        backend = "torch" if isinstance(model, torch.nn.Module) else "onnx"
        plan = plan_inference(device, batch_size=batch_size, backend=backend, workers=workers)
    model = prepare_model(model, plan)
    if preprocessing is not None and getattr(model, "takes_uint8", False):
        transform = preprocessing.eval_transform(normalize=False)
    loader = iter_image_batches(paths, transform, max_pixels, plan.batch_size, plan.workers, plan.device,
                                draft_size=draft_size, preprocessing=preprocessing)
    for images, indices, bad in loader:
        kept, skipped = [paths[i] for i in indices], [(paths[i], r) for i, r in bad]
        if images is None:
            empty = np.zeros((0, 0), dtype=np.float32)
            yield PredictedBatch(kept, empty, skipped, empty if features else None)
        elif features:
            logits, pooled = forward(model, images, plan, tta, features=True)
            yield PredictedBatch(kept, logits, skipped, pooled)
        else:
            yield PredictedBatch(kept, forward(model, images, plan, tta), skipped)


def prepare_model(model, plan: InferencePlan):
    """`model` on the plan's device, in eval mode and memory format; the plan's CPU threads set."""
    if plan.device == "cpu":
        torch.set_num_threads(plan.threads)
    if isinstance(model, torch.nn.Module):
        model = model.to(plan.device).eval()
        if plan.channels_last:
            model = model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def forward(model, images: torch.Tensor, plan: InferencePlan, tta: bool = False, features: bool = False):
    """Logits [B, n_classes] of a preprocessed batch, run as the plan says (a `prepare_model` model);
    with `features`, (logits, penultimate features [B, dim])."""
    device = torch.device(plan.device)
    images = images.to(device, non_blocking=True)
    if plan.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = plan.precision == "bf16" and plan.backend == "torch"
    run = _with_features if features else _logits_only
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run(model, images)
        if tta:
            out = tuple((a + b) / 2 for a, b in zip(out, run(model, images.flip(-1))))
    arrays = tuple(t.float().cpu().numpy() for t in out)
    return arrays if features else arrays[0]


def _logits_only(model, images: torch.Tensor) -> tuple[torch.Tensor]:
    return (model(images),)


def _with_features(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return logits_and_features(model, images)
    return model.logits_and_features(images)


