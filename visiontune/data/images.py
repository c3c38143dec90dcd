"""Decoding any image file a user may have into an 8-bit RGB PIL image, or a reason why not.

Every reader in visiontune goes through `load_rgb`, so training, checking and prediction agree on
which files are usable and on how odd modes (16-bit, CMYK, palette, alpha) become RGB.
"""

from __future__ import annotations

import errno
import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Transparent pixels are composited onto white: transparent backgrounds of product shots and
# scans are meant as "nothing", and the RGB values stored under them are arbitrary.
ALPHA_BACKGROUND = (255, 255, 255)

# OSErrors about the file system rather than the image's content (Pillow's own have no errno).
FILE_SYSTEM_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ESTALE,
                                errno.ETIMEDOUT, errno.EPERM})

# A truncated file must be reported, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(Exception):
    """The file cannot be used as an image; the message is the reason shown to the user."""


def is_image_file(path: Path) -> bool:
    """Candidate image: an image extension and no hidden component (`.DS_Store`, `._x.jpg`)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    sha1: str  # of the file's bytes: equal hashes are exact duplicates


def load_rgb(path: str | Path, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Open, EXIF-rotate and convert `path` to RGB; raise ImageLoadError with a reason otherwise.

    `draft_size` lets JPEG decoding work at a reduced scale (much faster) when only validity or a
    small thumbnail is needed; the whole file is still read, so truncation is still detected.
    """
    with _reasons():
        if Path(path).stat().st_size == 0:
            raise ImageLoadError("empty file (0 bytes)")
        with Image.open(path) as img:
            return _decode(img, max_pixels, draft_size)


def load_rgb_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """`load_rgb` for an upload held in memory: the same checks and reasons, no file involved.

    The pixel limit is checked from the header before any pixel is decoded, so a decompression
    bomb costs only its (small) upload.
    """
    with _reasons():
        if not data:
            raise ImageLoadError("empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as img:
            return _decode(img, max_pixels, None)


def inspect_image(path: str | Path, max_pixels: int) -> ImageInfo:
    """Hash the file and prove it decodes (at draft scale); the size is the stored one."""
    with _reasons():
        data = Path(path).read_bytes()
        if not data:
            raise ImageLoadError("empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            _decode(img, max_pixels, draft_size=64)
    return ImageInfo(width, height, hashlib.sha1(data).hexdigest())


def _decode(img: Image.Image, max_pixels: int, draft_size: int | None) -> Image.Image:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{width}x{height} = {width * height:,} pixels exceeds max_pixels "
            f"({max_pixels:,}); possible decompression bomb"
        )
    if width == 0 or height == 0:
        raise ImageLoadError(f"image has no pixels ({width}x{height})")
    if draft_size:
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


@contextmanager
def _reasons() -> Iterator[None]:
    """Turn everything Pillow and the file system raise for a bad file into ImageLoadError.

    The pixel limit is `_decode`'s check against the caller's max_pixels. No warnings filter is
    set here: `warnings.catch_warnings` is process-global and not thread-safe (`scan` runs this in
    threads, which left an "error" filter behind), and turning Pillow's DecompressionBombWarning
    into an error would cap max_pixels at Pillow's threshold whatever the caller asked for.
    """
    try:
        yield
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError("file not found (or a symbolic link to nothing)") from None
    except PermissionError:
        raise ImageLoadError("permission denied: the file cannot be read by this user") from None
    except IsADirectoryError:
        raise ImageLoadError("a folder, not an image file") from None
    except UnidentifiedImageError:  # an OSError too: before the file-system cases
        raise ImageLoadError("not a readable image (unknown or corrupt format)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageLoadError("symbolic link loop") from None
        if exc.errno in FILE_SYSTEM_ERRNOS:  # the disk or the path, not the image's bytes
            raise ImageLoadError(f"cannot read the file: {exc.strerror}") from None
        raise ImageLoadError(f"corrupt or truncated image: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"decompression bomb: {exc}") from None
    except (ValueError, SyntaxError, IndexError, TypeError, MemoryError) as exc:
        # Pillow's plugins raise these on malformed headers and tags.
        raise ImageLoadError(f"corrupt image: {exc.__class__.__name__}: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, keeping the visible content."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _rescale_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _rescale_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit and float images: scale by the type's range (or the data's, for floats)."""
    array = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
    elif img.mode.startswith("I;16") or array.max() > 255:
        scaled = array / 257.0  # 65535 -> 255
    else:
        scaled = array
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
