"""A synthetic, imbalanced, multi-class surface-defect set for the recipe suite (no ../shared needed).

Grayscale textured surfaces (smoothed noise with a random grain and brightness) of varied sizes
and aspect ratios; defect classes are small marks planted at a random place: a straight scratch,
a dark spot, a jagged crack and a faint stain. Like magnetic tiles, most images are defect-free,
the defects are small, and one class is rare.

    python benchmarks/synthetic_textures.py OUT [--scale 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COUNTS = {"clean": 400, "scratch": 70, "spot": 60, "crack": 40, "stain": 20}


def surface(rng: np.random.Generator) -> Image.Image:
    width, height = (int(v) for v in rng.integers(180, 360, 2))
    grain = float(rng.uniform(1.0, 3.0))
    noise = rng.normal(0, 1, (height, width))
    image = Image.fromarray(np.uint8(np.clip(128 + 40 * noise, 0, 255))).filter(ImageFilter.GaussianBlur(grain))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (pixels - pixels.mean()) * rng.uniform(1.5, 3.0) + rng.uniform(90, 170)
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))


def plant(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    draw = ImageDraw.Draw(image)
    x, y = float(rng.uniform(0.15, 0.85) * width), float(rng.uniform(0.15, 0.85) * height)
    size = float(rng.uniform(0.06, 0.14) * min(width, height))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * size * 2, np.sin(angle) * size * 2
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=int(rng.uniform(200, 240)), width=2)
    elif kind == "spot":
        r = size / 3
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(20, 50)))
    elif kind == "crack":
        points = [(x, y)]
        for _ in range(8):
            x, y = x + rng.normal(0, size / 3), y + rng.normal(size / 4, size / 4)
            points.append((x, y))
        draw.line(points, fill=int(rng.uniform(15, 40)), width=2)
    elif kind == "stain":
        r = size
        stain = Image.new("L", image.size, 0)
        ImageDraw.Draw(stain).ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=255)
        stain = stain.filter(ImageFilter.GaussianBlur(r / 3))
        darker = Image.fromarray(np.uint8(np.asarray(image, dtype=np.float32) * 0.8))
        image = Image.composite(darker, image, stain)
    return image


def make_dataset(out: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """OUT/<class>/<class>_<i>.jpg; returns OUT. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    for kind, count in COUNTS.items():
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(max(4, round(count * scale))):
            image = surface(rng)
            if kind != "clean":
                image = plant(image, kind, rng)
            image.save(folder / f"{kind}_{i:04d}.jpg", quality=92)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every class count.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_dataset(args.out, args.scale, args.seed))


if __name__ == "__main__":
    main()
