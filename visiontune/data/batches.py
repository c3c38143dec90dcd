"""Decoded image batches for inference, one loader for `predict` (`inference.engine.iter_logits`)
and `features` (`models.extractor.iter_features`), so both take the same decoding path.

On CUDA, given the transform's `Preprocessing`, JPEGs are decoded, resized and normalised on the
GPU (`jpeg_batches`, which has NOT been run on a GPU yet); elsewhere the transform runs in loader
worker processes (`ImageFiles`, JPEG draft decoding to `draft_size`), pinned on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from visiontune.data.dataset import ImageFiles, collate_image_files
from visiontune.data.jpeg_batches import iter_jpeg_batches
from visiontune.data.transforms import Preprocessing

Batch = tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]  # images, kept indices, (index, reason)


def decodes_on_device(device: torch.device) -> bool:
    """Whether JPEGs for `device` are decoded on it (nvJPEG) rather than in CPU workers."""
    return device.type == "cuda"


def iter_image_batches(paths: Sequence[str], transform: Callable, max_pixels: int, batch_size: int, workers: int,
                       device: str | torch.device, draft_size: int | None = None,
                       preprocessing: Preprocessing | None = None) -> Iterator[Batch]:
    """(images or None, kept indices in order, skipped (index, reason)), batch by batch.

    With `preprocessing` (the transform's own) on a device that decodes JPEGs itself, the images
    come out normalised on that device and `transform` is not used; otherwise they are
    `transform`'s output, on the CPU.
    """
    device = torch.device(device)
    if preprocessing is not None and decodes_on_device(device):
        normalize = preprocessing.normalizer()
        for images, indices, skipped in iter_jpeg_batches(paths, preprocessing.eval_transform(normalize=False),
                                                          max_pixels, batch_size, workers, device):
            yield (None if images is None else normalize(images)), indices, skipped
        return
    yield from DataLoader(ImageFiles(paths, transform, max_pixels, draft_size=draft_size), batch_size=batch_size,
                          num_workers=workers, collate_fn=collate_image_files, pin_memory=device.type == "cuda")
