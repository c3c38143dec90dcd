"""Patch scores to pixel anomaly maps, and maps drawn over images.

As in PaDiM and PatchCore (and anomalib): bilinear upsampling to the input size, then a Gaussian
blur with sigma 4 px, which removes the blockiness of the patch grid. The blur is torchvision's
(same kernel, reflect padding) done as two 1-D passes: the 33x33 2-D convolution took 7.6 ms per
256 px image on 2 CPU cores, half the backbone's time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visiontune.explain.overlay import overlay

SIGMA = 4.0


def smooth_anomaly_map(patch_scores: torch.Tensor, size: int, sigma: float = SIGMA) -> torch.Tensor:
    """[B, h, w] patch scores -> [B, size, size] pixel scores."""
    upsampled = F.interpolate(patch_scores[:, None], size=(size, size), mode="bilinear", align_corners=False)
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=upsampled.dtype, device=upsampled.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(upsampled, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))[:, 0]


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
