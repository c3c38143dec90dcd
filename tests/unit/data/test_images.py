"""Decoding odd and broken image files: `load_rgb`, `inspect_image`, `to_rgb`, `is_image_file`."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.data.images import (
    ALPHA_BACKGROUND,
    ImageLoadError,
    inspect_image,
    is_image_file,
    load_rgb,
    to_rgb,
)
from visiontune.data.samples import Sample
from visiontune.data.validate import scan

LIMIT = 1_000_000  # max_pixels for files that are not about the limit


def noisy(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def saved(img: Image.Image, path: Path, **options) -> Path:
    img.save(path, **options)
    return path


def rgb_array(path: Path, max_pixels: int = LIMIT) -> np.ndarray:
    """Load through `load_rgb`, check it is 8-bit RGB, and return the pixels."""
    img = load_rgb(path, max_pixels)
    assert img.mode == "RGB"
    array = np.asarray(img)
    assert array.dtype == np.uint8 and array.shape == (img.height, img.width, 3)
    return array


def assert_rejected(path: Path, fragment: str, max_pixels: int = LIMIT) -> None:
    """Both readers refuse `path` with a reason containing `fragment`."""
    for read in (load_rgb, inspect_image):
        with pytest.raises(ImageLoadError, match=fragment):
            read(path, max_pixels)


# --- files that must be rejected, each with a reason -------------------------------------------


def test_corrupt_bytes_with_jpg_extension(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)))
    assert_rejected(path, "not a readable image")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    assert_rejected(path, r"empty file \(0 bytes\)")


def test_truncated_jpeg_detected_by_both_readers(tmp_path):
    whole = saved(noisy(), tmp_path / "whole.jpg", quality=95).read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    # inspect_image decodes at draft scale; the truncation must still be noticed.
    assert_rejected(path, "truncated")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    assert_rejected(path, "not a readable image")


def test_missing_file(tmp_path):
    assert_rejected(tmp_path / "gone.jpg", "file not found")


def test_decompression_bomb_over_max_pixels(tmp_path):
    path = saved(noisy((300, 300)), tmp_path / "big.png")
    assert_rejected(path, "decompression bomb", max_pixels=10_000)
    with pytest.raises(ImageLoadError, match=r"300x300 = 90,000 pixels exceeds max_pixels \(10,000\)"):
        load_rgb(path, 10_000)
    assert load_rgb(path, 90_000).size == (300, 300)  # the limit itself is allowed


def test_max_pixels_above_pillow_limit_is_honoured(tmp_path, monkeypatch):
    """The caller's max_pixels decides, not Pillow's warning threshold (it only warns there)."""
    path = saved(noisy((40, 40)), tmp_path / "img.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 1,600 px: over the warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert load_rgb(path, 10_000).size == (40, 40)
        assert inspect_image(path, 10_000).width == 40


def test_scan_leaves_global_warning_filters_alone(tmp_path):
    """Threads in `scan` must not leave filters behind (catch_warnings is not thread-safe)."""
    samples = [
        Sample(str(saved(noisy((8, 8), i), tmp_path / f"{i}.png")), "a", "train") for i in range(60)
    ]
    before = list(warnings.filters)
    for _ in range(5):
        assert len(scan(samples, LIMIT, threads=8).readable) == 60
    assert warnings.filters == before


# --- odd but readable files become 8-bit RGB ----------------------------------------------------


def test_cmyk_jpeg(tmp_path):
    path = saved(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    pixels = rgb_array(path)
    assert pixels.shape == (20, 30, 3)
    assert np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 3  # cyan-free, magenta+yellow = red


def test_16_bit_png_keeps_its_ramp(tmp_path):
    ramp = np.linspace(0, 65535, 8 * 256).round().astype(np.uint16).reshape(8, 256)
    path = saved(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = rgb_array(path)
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) == 256


def test_palette_png(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([200, 10, 10, 10, 10, 200] + [0] * 762)
    img.putpixel((3, 4), 1)
    pixels = rgb_array(saved(img, tmp_path / "palette.png"))
    assert tuple(pixels[0, 0]) == (200, 10, 10)
    assert tuple(pixels[4, 3]) == (10, 10, 200)


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([200, 10, 10, 0, 0, 0] + [0] * 762)
    img.putpixel((2, 2), 1)
    path = saved(img, tmp_path / "palette_t.png", transparency=1)
    pixels = rgb_array(path)
    assert tuple(pixels[2, 2]) == ALPHA_BACKGROUND  # transparent black becomes the background
    assert tuple(pixels[0, 0]) == (200, 10, 10)


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[:, :10] = (30, 60, 90, 255)  # opaque left half
    rgba[:, 10:] = (30, 60, 90, 0)  # transparent right half, colour underneath is arbitrary
    pixels = rgb_array(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png"))
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert (pixels[:, 10:] == ALPHA_BACKGROUND).all()
    assert (pixels[:, :10] == (30, 60, 90)).all()


def test_grey_with_alpha_la(tmp_path):
    la = np.zeros((6, 6, 2), dtype=np.uint8)
    la[..., 0] = 80
    la[:3, :, 1] = 255  # top half opaque
    pixels = rgb_array(saved(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert (pixels[:3] == 80).all()
    assert (pixels[3:] == 255).all()


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg(tmp_path, orientation):
    img = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(img, tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(path, LIMIT).size == (20, 40)
    info = inspect_image(path, LIMIT)
    assert (info.width, info.height) == (40, 20)  # the stored size, not the displayed one


@pytest.mark.parametrize("mode", ["L", "1", "I", "F"])
def test_to_rgb_other_modes(mode):
    img = Image.fromarray(np.linspace(0, 255, 16, dtype=np.uint8).reshape(4, 4)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (4, 4)
    pixels = np.asarray(out)
    assert pixels.min() == 0 and pixels.max() == 255


def test_to_rgb_returns_rgb_untouched():
    img = noisy((5, 5))
    assert to_rgb(img) is img


# --- inspect_image ------------------------------------------------------------------------------


def test_inspect_image_size_and_hash(tmp_path):
    original = saved(noisy((50, 30), 7), tmp_path / "a.jpg", quality=90)
    copy = tmp_path / "sub" / "b.jpg"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    other = saved(noisy((50, 30), 8), tmp_path / "c.jpg", quality=90)
    a, b, c = (inspect_image(p, LIMIT) for p in (original, copy, other))
    assert (a.width, a.height) == (50, 30)
    assert a.sha1 == b.sha1 == hashlib.sha1(original.read_bytes()).hexdigest()
    assert c.sha1 != a.sha1


# --- is_image_file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cat.jpg", True),
        ("CAT.JPEG", True),
        ("scan.TIF", True),
        ("x.webp", True),
        (".DS_Store", False),
        ("._cat.jpg", False),
        (".hidden.png", False),
        ("notes.txt", False),
        ("labels.csv", False),
        ("archive.jpg.zip", False),
        ("noextension", False),
    ],
)
def test_is_image_file(name, expected):
    assert is_image_file(Path("/data/cats") / name) is expected


@pytest.mark.parametrize(("error", "reason"), [
    (PermissionError(13, "Permission denied"), "permission denied"),
    (OSError(40, "Too many levels of symbolic links"), "symbolic link loop"),
    (OSError(5, "Input/output error"), "cannot read the file: Input/output error"),
    (OSError("image file is truncated"), "corrupt or truncated image"),
])
def test_file_system_errors_are_not_called_corrupt_images(tmp_path, monkeypatch, error, reason):
    path = saved(noisy((8, 8)), tmp_path / "a.png")

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Path, "read_bytes", fail)
    with pytest.raises(ImageLoadError, match=reason):
        inspect_image(path, 10_000)


def test_unreadable_permissions_are_named(tmp_path):
    import os

    path = saved(noisy((8, 8)), tmp_path / "locked.png")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: file permissions do not apply (the case above fakes the error)")
    assert_rejected(path, "permission denied")


def test_symlink_loops_and_dangling_links_are_listed_and_named(tmp_path):
    from visiontune.data.samples import Sample
    from visiontune.data.sources import list_image_files
    from visiontune.data.validate import scan

    saved(noisy((8, 8)), tmp_path / "real.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    listed = list_image_files(tmp_path)
    assert [p.name for p in listed] == ["gone.jpg", "loop.png", "real.png"]
    result = scan([Sample(str(p), "x", "train") for p in listed], 10_000)
    reasons = {s.path.rsplit("/", 1)[1]: s.reason for s in result.skipped}
    assert reasons == {"loop.png": "symbolic link loop", "gone.jpg": "file not found (or a symbolic link to nothing)"}
