"""Batched inference over image files with bounded memory: decode in workers, stream results.

Results come out batch by batch, so memory does not grow with the number of images; unreadable
files come out with their reason instead of stopping the stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from visiontune.data.dataset import ImageFiles, collate_image_files, default_workers
from visiontune.data.sources import list_image_files
from visiontune.errors import UserError
from visiontune.training.losses import ClassificationLoss


@dataclass
class PredictedBatch:
    paths: list[str]
    logits: np.ndarray  # (len(paths), n_classes), float32
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def iter_logits(
    model: torch.nn.Module,
    transform,
    paths: Sequence[str],
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = 89_478_485,
    tta: bool = False,
    device: str | torch.device = "cpu",
) -> Iterator[PredictedBatch]:
    """Logits for `paths` in order, batch by batch; `tta` averages with the horizontal flip."""
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        ImageFiles(paths, transform, max_pixels), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_image_files, pin_memory=device.type == "cuda",
    )
    with torch.inference_mode():
        for images, indices, bad in loader:
            logits = np.zeros((0, 0), dtype=np.float32)
            if images is not None:
                images = images.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = model(images)
                    if tta:
                        out = (out + model(images.flip(-1))) / 2
                logits = out.float().cpu().numpy()
            yield PredictedBatch([paths[i] for i in indices], logits, [(paths[i], r) for i, r in bad])


def probabilities(logits: np.ndarray, loss: str, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities the way the run's loss defines them, after temperature scaling."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature
    return ClassificationLoss(loss, num_classes=scaled.shape[1]).probabilities(scaled).numpy()


def expand_image_paths(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders searched recursively for image files (hidden ones skipped)."""
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [str(p) for p in list_image_files(path)]
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserError(f"no such file or folder: {path}")
    if not found:
        raise UserError("no image files found in " + ", ".join(map(str, inputs)))
    return found

