"""JPEG decoding on the GPU: loader workers only read bytes, `torchvision.io.decode_jpeg` decodes
a whole batch on the device (nvJPEG), and the evaluation resize and crop run there too.

A file goes the CPU way instead (`load_rgb` + the same transform, in the worker) when it is not a
baseline/progressive RGB or greyscale JPEG (PNG, CMYK, ...), is over the pixel limit or cannot
be opened, or when the device decoder rejects it; unreadable files come out with their reason,
as everywhere. The same code runs with `device="cpu"` (torchvision's libjpeg), which is how it
is tested here: it has NOT been run on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from visiontune.data.images import ImageLoadError, load_rgb

DEVICE_MODES = frozenset({"RGB", "L"})  # JPEG colour modes nvJPEG decodes to RGB as Pillow does


class JpegBytes(Dataset):
    """Items (kind, payload, index): ("jpeg", file bytes as uint8), ("image", the CPU-decoded and
    transformed uint8 CHW tensor) or ("skipped", reason)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable, max_pixels: int) -> None:
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, object, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                device_ok = img.format == "JPEG" and img.mode in DEVICE_MODES and \
                    img.size[0] * img.size[1] <= self.max_pixels
            if device_ok:
                with open(path, "rb") as handle:
                    return "jpeg", torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8), index
        except (OSError, ValueError, SyntaxError):
            pass  # load_rgb gives the reason
        return self.cpu_item(index)

    def cpu_item(self, index: int) -> tuple[str, object, int]:
        try:
            return "image", self.transform(load_rgb(self.paths[index], self.max_pixels)), index
        except ImageLoadError as exc:
            return "skipped", str(exc), index


def _collate(items: list) -> list:
    return items


def iter_jpeg_batches(paths: Sequence[str], transform: Callable, max_pixels: int, batch_size: int, workers: int,
                      device: str | torch.device) -> Iterator[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]]:
    """(uint8 [B, 3, H, W] on `device` or None, kept indices in order, (index, reason) skipped), batch
    by batch. `transform` is a `normalize=False` evaluation transform (it runs on tensors on the
    device and on PIL images in the CPU fallback); normalise with `Preprocessing.normalizer()`."""
    dataset = JpegBytes(paths, transform, max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    for items in loader:
        yield decode_items(items, dataset, torch.device(device))


def decode_items(items: list, dataset: JpegBytes, device: torch.device
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """One batch of `JpegBytes` items decoded: JPEG bytes together on `device`, one by one when the
    batch call fails, and on the CPU path for any file the device decoder rejects."""
    images: dict[int, torch.Tensor] = {}
    skipped: list[tuple[int, str]] = []
    jpegs = [(index, payload) for kind, payload, index in items if kind == "jpeg"]
    for kind, payload, index in items:
        if kind == "image":
            images[index] = payload.to(device)
        elif kind == "skipped":
            skipped.append((index, payload))
    for index, decoded in _decode_jpegs(jpegs, device):
        if decoded is None:
            kind, payload, _ = dataset.cpu_item(index)
            if kind == "skipped":
                skipped.append((index, payload))
                continue
            decoded = payload.to(device)
        else:
            decoded = dataset.transform(decoded)
        images[index] = decoded
    kept = sorted(images)
    batch = torch.stack([images[i] for i in kept]) if kept else None
    return batch, kept, sorted(skipped)


def _decode_jpegs(jpegs: list[tuple[int, torch.Tensor]], device: torch.device
                  ) -> list[tuple[int, torch.Tensor | None]]:
    """(index, decoded uint8 CHW on `device` or None where the decoder failed)."""
    if not jpegs:
        return []
    data = [payload for _, payload in jpegs]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return [(index, image) for (index, _), image in zip(jpegs, decoded)]
    except RuntimeError:
        pass  # one bad file fails the batch call: decode one by one
    results = []
    for index, payload in jpegs:
        try:
            results.append((index, decode_jpeg(payload, mode=ImageReadMode.RGB, device=device,
                                               apply_exif_orientation=True)))
        except RuntimeError:
            results.append((index, None))
    return results
