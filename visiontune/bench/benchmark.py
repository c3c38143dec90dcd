"""`visiontune benchmark`: images/s per device and batch size, model only and end to end.

Model-only time runs the network on a ready tensor; end-to-end time runs `predict`'s inference path
(`iter_logits` as `predict` calls it: JPEG draft decoding and resize in worker processes, uint8
batches where the model normalises them itself, GPU decoding on CUDA; batching; the model) over
real or synthetic photos and counts only batches after the first, so start-up (worker processes,
first call) is excluded. Memory is the process's peak resident set during each row (Linux resets the
high-water mark between rows) and, on CUDA, the peak allocated by torch.
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.paths import expand_image_paths
from visiontune.data.transforms import Preprocessing
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.inference.engine import (
    InferencePlan,
    iter_logits,
    load_for_inference,
    plan_inference,
)
from visiontune.inference.onnx import (
    OnnxModel,
    calibration_batches,
    export_model,
    quantize_int8,
)
from visiontune.inference.openvino import OpenVinoModel
from visiontune.inference.timing import time_call
from visiontune.models.backbones import create_classifier
from visiontune.models.classifier_run import ClassifierRun
from visiontune.runformat import META_FILE

COLUMNS = ("device", "mode", "batch_size", "images_per_s", "ms_per_image", "e2e_images_per_s",
           "e2e_ms_per_image", "peak_rss_mb", "cuda_max_allocated_mb")
SPEED_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
SYNTHETIC_SIZE = (500, 375)  # a typical phone-photo thumbnail, like hymenoptera's


class Subject:
    """What is benchmarked: a module, its preprocessing, and (for a run) its directory."""

    def __init__(self, model_or_run: str, weights: str | None = None) -> None:
        path = Path(model_or_run).expanduser()
        self.run = None
        if (path / META_FILE).is_file():
            self.run = ClassifierRun(path)
            self.name, self.model = f"run {path}", self.run.load_model("best")
            self.preprocessing, self.max_pixels = self.run.preprocessing, self.run.config.max_pixels
            return
        if os.sep in model_or_run or path.exists():
            raise UserError(f"{model_or_run} is not a run directory (no model.json) and not a timm model name")
        self.name = model_or_run + ("" if weights else " (random init)")
        self.model = create_classifier(model_or_run, 2, pretrained=weights is not None, weights=weights).eval()
        self.preprocessing, self.max_pixels = Preprocessing.from_model(self.model), DEFAULT_MAX_PIXELS

    def runner(self, plan: InferencePlan, images: Sequence[str], workdir: Path):
        """The module, or an ONNX Runtime / OpenVINO model exported (and int8-calibrated on `images`) for it."""
        if plan.backend == "torch":
            return self.model
        if self.run is not None:
            return load_for_inference(self.run, plan)[0]  # as `predict` loads it
        path = export_model(self.model, workdir / "model.onnx", self.preprocessing.input_size)
        if plan.quantize:
            batches = calibration_batches(images[:64], self.preprocessing.eval_transform(), self.max_pixels)
            path = quantize_int8(path, workdir / "model.int8.onnx", batches)
        if plan.backend == "openvino":
            normalization = (self.preprocessing.mean, self.preprocessing.std)
            return OpenVinoModel(path, plan.threads, plan.precision, normalization)
        return OnnxModel(path, plan.threads)


def benchmark(
    model_or_run: str,
    devices: Sequence[str] = ("cpu",),
    batch_sizes: Sequence[int] = (1, 10, 50, 100, 500),
    train: bool = False,
    data: str | None = None,
    weights: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    **plan_options,
) -> dict:
    """Rows of COLUMNS per device and batch size (inference, and training steps with `train`).

    `plan_options` (backend, precision, quantize, threads, workers) override the automatic plan.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes must be positive integers, e.g. 1,10,50")
    subject = Subject(model_or_run, weights)
    result = {"model": subject.name, "machine": machine(), "load_average_before": _loadavg(),
              "plans": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="visiontune-bench-") as tmp:
        images = expand_image_paths([data]) if data else synthetic_photos(Path(tmp) / "photos")
        for name in devices:
            device = resolve_device(name)
            if name != "auto" and device.type != name:
                raise UserError(f"--device {name} is not available here")
            plan = plan_inference(device, **plan_options)
            result["plans"][device.type] = plan.to_dict() | {"description": plan.describe()}
            runner = subject.runner(plan, images, Path(tmp))
            for batch_size in batch_sizes:
                result["rows"].append(_inference_row(subject, runner, plan, batch_size, images, repeats, warmup))
            if train:  # training runs in torch whatever the inference backend: channels-last, same precision
                train_plan = replace(plan, backend="torch", quantize=None, channels_last=True)
                for batch_size in batch_sizes:
                    result["rows"].append(_train_row(subject.model, train_plan, batch_size,
                                                     subject.preprocessing.input_size, repeats, warmup))
    result["load_average_after"] = _loadavg()
    return result


def _inference_row(subject: Subject, runner, plan: InferencePlan, batch_size: int, images: Sequence[str],
                   repeats: int, warmup: int) -> dict:
    plan = replace(plan, batch_size=batch_size)
    device = torch.device(plan.device)
    size = subject.preprocessing.input_size
    _reset_peaks(device)
    if isinstance(runner, nn.Module):
        runner = runner.to(device).eval()
        if plan.channels_last:
            runner = runner.to(memory_format=torch.channels_last)
    if plan.device == "cpu":
        torch.set_num_threads(plan.threads)
    x = torch.randn(batch_size, 3, size, size, device=device)
    if plan.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = plan.precision == "bf16" and plan.backend == "torch"

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            runner(x)

    model_time = time_call(forward, warmup=warmup, repeats=repeats, device=device).median / batch_size
    # End to end: 8 batches (128 images at least) of real decoding; the first batch (start-up) is
    # not counted, and enough follow it that the batches prefetched meanwhile barely flatter the rate.
    paths = [images[i % len(images)] for i in range(max(8 * batch_size, 128))]
    counted, start, skipped = 0, None, []
    preprocessing = subject.preprocessing
    for batch in iter_logits(runner, preprocessing.eval_transform(), paths, max_pixels=subject.max_pixels, plan=plan,
                             draft_size=preprocessing.resize_size, preprocessing=preprocessing):
        skipped += batch.skipped
        if start is None:
            start = time.perf_counter()
        else:
            counted += len(batch.paths)
    if not counted:  # nothing decoded: a rate would time only the failures
        path, reason = skipped[0] if skipped else (images[0], "no image decoded")
        raise UserError(f"cannot time end to end: the --data images do not decode ({path}: {reason})")
    e2e_time = (time.perf_counter() - start) / max(1, counted)
    return _row(plan, "infer", batch_size, model_time, e2e_time, device)


def _train_row(model: nn.Module, plan: InferencePlan, batch_size: int, size: int, repeats: int, warmup: int) -> dict:
    """Forward, backward and an AdamW step on random images: the training step's own speed."""
    device = torch.device(plan.device)
    _reset_peaks(device)
    model = model.to(device).train()
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randn(batch_size, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if plan.channels_last else x
    y = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_call(step, warmup=warmup, repeats=repeats, device=device).median / batch_size
    model.eval()
    return _row(plan, "train", batch_size, seconds, None, device)


def _row(plan: InferencePlan, mode: str, batch_size: int, model_time: float, e2e_time: float | None,
         device: torch.device) -> dict:
    return {
        "device": plan.device, "mode": mode, "batch_size": batch_size,
        "images_per_s": 1 / model_time, "ms_per_image": 1000 * model_time,
        "e2e_images_per_s": None if e2e_time is None else 1 / e2e_time,
        "e2e_ms_per_image": None if e2e_time is None else 1000 * e2e_time,
        "peak_rss_mb": _peak_rss_mb(),
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def synthetic_photos(folder: Path, count: int = 16, size: tuple[int, int] = SYNTHETIC_SIZE) -> list[str]:
    """`count` photo-like JPEGs (smooth colour fields plus noise) so decoding costs what it does on photos."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    paths = []
    for i in range(count):
        waves = [np.sin(xx * rng.uniform(2, 12) + yy * rng.uniform(2, 12) + rng.uniform(0, 6)) for _ in range(3)]
        pixels = (np.stack(waves, -1) * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"photo_{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def machine(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU as /proc/cpuinfo names it (a VM's "AMD EPYC" hides the generation, so family, model and
    the vector flags that decide CPU inference speed are kept too), cores, torch and the GPU."""
    fields = {}
    try:
        with open(cpuinfo) as info:
            for line in info:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    family = f"{fields['cpu family']}/{fields.get('model', '?')}" if "cpu family" in fields else None
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model": family, "cpu_flags": sorted(set(fields.get("flags", "").split()) & SPEED_FLAGS),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _reset_peaks(device: torch.device) -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            return next(float(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # elsewhere: the peak since the process started
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
