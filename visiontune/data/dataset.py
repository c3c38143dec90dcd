"""A map-style dataset over scanned samples that never raises on a bad file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from visiontune.data.cache import DecodedImageCache
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.paths import PathList
from visiontune.data.samples import Sample

log = logging.getLogger(__name__)


def load_image(path: str | os.PathLike, max_pixels: int, cache: DecodedImageCache | None,
               draft_size: int | None = None):
    """A PIL image, or with a cache the resized uint8 tensor; ImageLoadError either way.
    `draft_size`: see `load_rgb` (JPEGs decoded at the smallest DCT scale covering it)."""
    return cache.load(path, max_pixels) if cache is not None else load_rgb(path, max_pixels, draft_size)


class TransformError(RuntimeError):
    """A transform raised on a readable image (a bug or an unsupported option, not a bad file)."""


class ImageDataset(Dataset):
    """Returns (image tensor, class index), or None for a file that stopped decoding since the scan.

    With a `cache`, the transform receives the cached, already-resized uint8 tensor instead of
    the PIL image; `Preprocessing`'s transforms accept both.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_to_index: dict[str, int],
        transform: Callable,
        max_pixels: int,
        cache: DecodedImageCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.targets = [class_to_index[s.label] for s in self.samples]
        self.transform = transform
        self.max_pixels = max_pixels
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        sample = self.samples[index]
        try:
            image = load_image(sample.path, self.max_pixels, self.cache)
        except ImageLoadError as exc:
            log.warning("skipping %s: %s", sample.path, exc)
            return None
        try:
            return self.transform(image), self.targets[index]
        except Exception as exc:  # name the file: a worker's traceback alone does not
            raise TransformError(f"the transform failed on {sample.path}: {type(exc).__name__}: {exc}") from exc


def collate_skipping_none(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Drop samples that failed to load; a batch with none left becomes None (the loop skips it)."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


class ImageFiles(Dataset):
    """Unlabelled files for inference: items (image, index, None), or (None, index, reason).

    `draft_size`, for transforms that resize the shorter side (or both) down to it anyway: JPEGs
    are decoded at the smallest DCT scale (1/2, 1/4, 1/8) still covering it (`load_rgb`).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        transform: Callable,
        max_pixels: int,
        cache: DecodedImageCache | None = None,
        draft_size: int | None = None,
    ) -> None:
        self.draft_size = draft_size
        self.paths = paths if isinstance(paths, PathList) else list(paths)  # a PathList stays packed
        self.transform, self.max_pixels, self.cache = transform, max_pixels, cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            image = load_image(self.paths[index], self.max_pixels, self.cache, self.draft_size)
            return self.transform(image), index, None
        except ImageLoadError as exc:
            return None, index, str(exc)


def collate_image_files(items: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """(stacked readable images or None, their indices, (index, reason) of unreadable ones)."""
    kept = [(image, index) for image, index, _ in items if image is not None]
    skipped = [(index, reason) for image, index, reason in items if image is None]
    images = torch.stack([image for image, _ in kept]) if kept else None
    return images, [index for _, index in kept], skipped


def default_workers() -> int:
    """Loader workers from the cores this process may use, leaving one for the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, max(0, cores - 1))
