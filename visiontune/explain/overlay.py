"""Heat maps drawn over the image the model actually saw (resized and centre-cropped).

Drawing on the original file would misplace the heat wherever the crop cut something off.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from visiontune.data.transforms import Preprocessing
from visiontune.io import atomic_write

COLORMAP = "jet"
MAX_ALPHA = 0.6


def model_view(batch: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """Undo the normalisation of evaluation inputs [B, 3, H, W]: uint8 images [B, H, W, 3]."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    pixels = (batch.detach().cpu() * std + mean) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def overlay(view: np.ndarray, heat: np.ndarray, colormap: str = COLORMAP) -> Image.Image:
    """Colour `heat` [H, W] in [0, 1] over `view` [H, W, 3]; cold pixels keep the image as is."""
    colours = matplotlib.colormaps[colormap](heat)[..., :3]
    alpha = MAX_ALPHA * heat[..., None]
    blended = (1 - alpha) * (view / 255.0) + alpha * colours
    return Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8))


def save_png(image: Image.Image, path: Path) -> Path:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
