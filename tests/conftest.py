"""Shared fixtures: tiny synthetic image folders and a tiny timm model, no network, no ../shared."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
# the decoded-image cache of test runs lives in a throwaway folder, never the user's cache
os.environ["VISIONTUNE_CACHE"] = tempfile.mkdtemp(prefix="visiontune-test-cache-")

TINY_MODEL = "test_resnet"  # timm's ~0.5M-parameter test ResNet
# The staged machinery without the linear probe (tests of the probe turn it on).
TINY_OPTIONS = dict(
    model=TINY_MODEL, pretrained=False, image_size=32, batch_size=8, workers=0, epochs=2,
    freeze_epochs=1, probe=False, lr=1e-3, crop_mode="center", augment="none", progress=False, report=False,
)
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 210)}


def colour_image(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A noisy flat colour: classes are separable by colour alone, so tiny models learn them."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(0, 20, (size[1], size[0], 3)) + np.array(colour)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_class_folders(root: Path, classes: dict[str, int], ext: str = ".png", seed: int = 0) -> Path:
    """root/<class>/<class>_<i><ext> for each class name -> count (colours from COLOURS)."""
    for k, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = COLOURS.get(name, tuple(int(v) for v in np.random.default_rng(k).integers(0, 255, 3)))
        for i in range(count):
            colour_image(colour, seed * 10_000 + k * 1000 + i).save(folder / f"{name}_{i:03d}{ext}")
    return root


@pytest.fixture
def binary_folder(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "binary", {"blue": 12, "red": 12})


@pytest.fixture
def three_class_folder(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "three", {"blue": 10, "green": 10, "red": 10})


@pytest.fixture
def split_folders(tmp_path: Path) -> Path:
    """train/ val/ test/ each with class folders."""
    root = tmp_path / "splitdata"
    for split, n, seed in (("train", 8, 1), ("val", 3, 2), ("test", 3, 3)):
        write_class_folders(root / split, {"blue": n, "red": n}, seed=seed)
    return root


BOMB_MAX_PIXELS = 5_000  # tests pass this as max_pixels: normal fixtures are 40x48 = 1,920 px


def write_odd_and_bad_files(folder: Path) -> tuple[set[str], set[str]]:
    """Seed `folder` with every odd-but-readable and every unusable kind of file.

    Returns (names that must be used, names that must be skipped and reported).
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = colour_image(COLOURS["red"], seed=99)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    ramp = (np.linspace(0, 65535, 40 * 48).reshape(48, 40)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.png")
    base.convert("P").save(folder / "palette.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    base.convert("LA").save(folder / "grey_alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    base.save(folder / "exif_rotated.jpg", exif=exif)
    readable = {"cmyk.jpg", "sixteen_bit.png", "palette.png", "alpha.png", "grey_alpha.png", "exif_rotated.jpg"}

    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    jpeg = folder / "truncated.jpg"
    colour_image(COLOURS["red"], seed=98, size=(64, 64)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:700])
    (folder / "text.png").write_text("a text file with an image extension")
    colour_image(COLOURS["red"], seed=97, size=(100, 100)).save(folder / "bomb.png")  # 10,000 px
    bad = {"corrupt.jpg", "empty.png", "truncated.jpg", "text.png", "bomb.png"}

    (folder / "notes.txt").write_text("not an image extension: ignored, not reported")
    (folder / ".DS_Store").write_bytes(b"\0\1\2")
    return readable, bad
