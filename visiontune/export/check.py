"""The check every export gets: its logits against the eager fp32 torch model's on real inputs.

An export that silently computes something else (a traced branch, an unsupported op replaced, a
quantization gone wrong) is worse than none, so the difference is measured on up to 16 of the
run's validation images, written beside the file as OUT.check.json, and an fp32 export beyond
TOLERANCE is refused with the numbers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.errors import UserError
from visiontune.io import atomic_write, write_text_atomic
from visiontune.models.classifier_run import ClassifierRun
from visiontune.runformat import SPLITS_FILE

TOLERANCE = 1e-3  # max |logit difference| of an fp32 export: round-off is ~1e-5, a wrong graph is >> 1e-3
CHECK_IMAGES = 16
REFERENCE = "torch eager fp32"


def check_inputs(run: ClassifierRun, n: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """Up to `n` readable validation images (training ones when there is no val split), preprocessed
    as predict does; seeded noise, said so, when none can be read (a run copied without its data)."""
    transform, max_pixels = run.preprocessing.eval_transform(), run.config.max_pixels
    for split in ("val", "train"):
        images = []
        for path in run.split_paths(split):
            try:
                images.append(transform(load_rgb(path, max_pixels)))
            except (ImageLoadError, OSError):
                continue
            if len(images) == n:
                break
        if images:
            return torch.stack(images), f"{split} images"
    size = run.preprocessing.input_size
    noise = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    return noise, f"random inputs (no readable image listed in {SPLITS_FILE})"


def check_export(run: ClassifierRun, exported: Path, forward: Callable[[torch.Tensor], torch.Tensor],
                 quantized: bool = False) -> dict:
    """Compare `forward` (the exported model) with the run's eager model; write EXPORTED.check.json.

    fp32: a max abs difference above TOLERANCE is a UserError. int8 differs by design, so its
    argmax agreement is reported instead of failing.
    """
    images, source = check_inputs(run)
    with torch.inference_mode():
        reference = run.load_model("best").float().eval()(images)
        logits = forward(images).float()
    check = {
        "max_abs_diff": float((logits - reference).abs().max()), "images": len(images),
        "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
        "reference": REFERENCE, "inputs": source, "tolerance": None if quantized else TOLERANCE,
    }
    write_text_atomic(exported.with_name(exported.name + ".check.json"), json.dumps(check, indent=2) + "\n")
    if not quantized and check["max_abs_diff"] > TOLERANCE:
        raise UserError(
            f"{exported} does not match the torch model: max |logit difference| {check['max_abs_diff']:.3g} > "
            f"{TOLERANCE:g} on {check['images']} {source} (argmax agreement {check['argmax_agreement']:.3f}); "
            f"do not deploy it"
        )
    return check


def copy_checked(exported: Path, destination: Path, check: dict) -> Path:
    """Copy a checked export (RUN/export/ is its cache) to `destination`, its check.json beside it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not (destination.exists() and destination.samefile(exported)):
        atomic_write(destination, lambda tmp: shutil.copyfile(exported, tmp))
        write_text_atomic(destination.with_name(destination.name + ".check.json"), json.dumps(check, indent=2) + "\n")
    return destination
