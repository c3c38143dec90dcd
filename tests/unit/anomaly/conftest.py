"""Synthetic defect data: grainy, unevenly lit textures; defects are drawn scratches whose masks
come from the same drawing. Written once per session in both evaluation layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

SIZE = 96
N_TRAIN, N_TEST = 40, 16


def texture(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    base = rng.uniform(110, 150)
    gradient = np.linspace(-1, 1, size)[None, :] * rng.uniform(-15, 15)
    low = Image.fromarray(rng.normal(0, 12, (6, 6)).astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 10, (size, size))
    grey = np.clip(base + gradient + np.asarray(low) + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").filter(ImageFilter.GaussianBlur(0.7))
    return Image.merge("RGB", [image] * 3)


def scratch(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Draw 1-2 scratches on `image` in place; return their mask (L, 0 or 255)."""
    size = image.size[0]
    mask = Image.new("L", image.size, 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 3)):
        x0, y0 = rng.uniform(0.15, 0.85, 2) * size
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.5) * size
        end = (x0 + np.cos(angle) * length, y0 + np.sin(angle) * length)
        level = int(rng.choice([rng.uniform(215, 255), rng.uniform(0, 40)]))
        width = int(rng.integers(2, 4))
        draw.line([(x0, y0), end], fill=(level,) * 3, width=width)
        draw_mask.line([(x0, y0), end], fill=255, width=width)
    return mask


def write_mvtec(root: Path, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """root/train/good, root/test/{good,scratch}, root/ground_truth/scratch/<name>_mask.png."""
    rng = np.random.default_rng(seed)
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        texture(rng).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_test):
        texture(rng).save(root / "test/good" / f"{i:03d}.png")
        image = texture(rng)
        mask = scratch(image, rng)
        image.save(root / "test/scratch" / f"{i:03d}.png")
        mask.save(root / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def mvtec(tmp_path_factory) -> Path:
    return write_mvtec(tmp_path_factory.mktemp("mvtec") / "texture")


def write_plain(root: Path, seed: int = 1, n: int = 6) -> Path:
    """root/good, root/scratch, masks as same-name files in root/masks/scratch."""
    rng = np.random.default_rng(seed)
    for folder in ("good", "scratch", "masks/scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        texture(rng).save(root / "good" / f"g{i}.png")
        image = texture(rng)
        mask = scratch(image, rng)
        image.save(root / "scratch" / f"s{i}.png")
        mask.save(root / "masks/scratch" / f"s{i}.png")
    return root


FIT_OPTIONS = dict(backbone="resnet18", pretrained=False, image_size=SIZE, coreset_ratio=0.1, workers=0,
                   batch_size=16)
