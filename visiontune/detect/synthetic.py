"""Generated tiles for detection: textured grey tiles with 0-3 cracks (thin dark polylines) and
blobs (dark ellipses), classes `crack` and `blob`. The demo data, the tests' data and the
benchmark's.

Each object is drawn into its own mask, placed apart from the others, and its box is its mask's
extent, so the same boxes can be written in every annotation format (COCO JSON always; VOC XML,
YOLO txt and class-folder masks on request) and every parser must read back exactly these boxes.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from visiontune.errors import UserError
from visiontune.io import atomic_write, write_text_atomic

CLASSES = ("crack", "blob")
EXTRA_FORMATS = ("voc", "yolo", "masks")
MAX_OBJECTS = 3
PLACEMENT_TRIES = 30
GAP = 3  # pixels kept free around every object, so masks' components are the objects


def make_tiles(out: str | Path, n_images: int, size: int = 512, seed: int = 0,
               formats: tuple[str, ...] = ()) -> Path:
    """Write OUT/images/tile_NNNNN.png and OUT/annotations.json (COCO), plus OUT/voc/, OUT/yolo/
    (with classes.txt) and OUT/masks/<class>/ for the `formats` asked for; the COCO path back."""
    unknown = set(formats) - set(EXTRA_FORMATS)
    if unknown:
        raise UserError(f"unknown tile formats {sorted(unknown)}; choose from {', '.join(EXTRA_FORMATS)}")
    if n_images < 1 or size < 32:
        raise UserError("make at least one tile of at least 32 pixels")
    out = Path(out).expanduser()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    for i in range(n_images):
        name = f"tile_{i:05d}"
        pixels, objects = _tile(rng, size)
        atomic_write(out / "images" / f"{name}.png",
                     lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, format="PNG"))
        coco["images"].append({"id": i + 1, "file_name": f"{name}.png", "width": size, "height": size})
        for label, box, _ in objects:
            x1, y1, x2, y2 = box
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": CLASSES.index(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        if "voc" in formats:
            write_text_atomic(out / "voc" / f"{name}.xml", _voc_xml(f"{name}.png", size, objects))
        if "yolo" in formats:
            write_text_atomic(out / "yolo" / f"{name}.txt", "".join(
                f"{CLASSES.index(label)} {(b[0] + b[2]) / 2 / size:.7f} {(b[1] + b[3]) / 2 / size:.7f} "
                f"{(b[2] - b[0]) / size:.7f} {(b[3] - b[1]) / size:.7f}\n" for label, b, _ in objects))
        if "masks" in formats:
            for label in CLASSES:
                mask = np.zeros((size, size), dtype=np.uint8)
                for other, _, object_mask in objects:
                    if other == label:
                        mask[object_mask] = 255
                path = out / "masks" / label / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, mask=mask: Image.fromarray(mask).save(tmp, format="PNG"))
    if "yolo" in formats:
        write_text_atomic(out / "yolo" / "classes.txt", "".join(f"{n}\n" for n in CLASSES))
    write_text_atomic(out / "annotations.json", json.dumps(coco))
    return out / "annotations.json"


def _tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...], np.ndarray]]]:
    """A tile's pixels and its objects (class, xyxy box, mask)."""
    base = rng.uniform(120, 175)
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 16)
    grey = base + 14 * smooth / (smooth.std() + 1e-9) + rng.normal(0, 6, (size, size))
    grout = max(1, size // 128)
    for edge in (0, size - grout):  # the tile's lighter grout along two edges
        grey[edge:edge + grout, :] += 35
        grey[:, edge:edge + grout] += 35
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(0, MAX_OBJECTS + 1))):
        label = CLASSES[int(rng.integers(len(CLASSES)))]
        for _ in range(PLACEMENT_TRIES):
            mask = _crack(rng, size) if label == "crack" else _blob(rng, size)
            if mask.any() and not (ndimage.binary_dilation(mask, iterations=GAP) & occupied).any():
                break
        else:
            continue
        occupied |= mask
        grey[mask] = rng.uniform(35, 75) + rng.normal(0, 5, int(mask.sum()))
        rows, cols = np.nonzero(mask)
        objects.append((label, (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1), mask))
    pixels = np.clip(grey, 0, 255).astype(np.uint8)
    return np.stack([pixels] * 3, axis=-1), objects


def _crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin random polyline, 0.15-0.4 of the tile long, inside the tile."""
    margin = GAP + 2
    length = rng.uniform(0.15, 0.4) * size
    steps = int(rng.integers(3, 7))
    angle = rng.uniform(0, 2 * np.pi)
    points = [rng.uniform(margin, size - margin, 2)]
    for _ in range(steps):
        angle += rng.normal(0, 0.6)
        step = points[-1] + length / steps * np.array([np.cos(angle), np.sin(angle)])
        points.append(np.clip(step, margin, size - margin))
    image = Image.new("L", (size, size))
    width = max(1, int(round(size / 160 * rng.uniform(1, 2))))
    ImageDraw.Draw(image).line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    return np.asarray(image) > 0


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A filled ellipse with radii 0.03-0.09 of the tile, inside the tile."""
    rx, ry = rng.uniform(0.03, 0.09, 2) * size
    margin = GAP + 2
    cx = rng.uniform(margin + rx, size - margin - rx)
    cy = rng.uniform(margin + ry, size - margin - ry)
    image = Image.new("L", (size, size))
    ImageDraw.Draw(image).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(image) > 0


def _voc_xml(filename: str, size: int, objects) -> str:
    parts = [f"<annotation><filename>{escape(filename)}</filename>"
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"]
    for label, (x1, y1, x2, y2), _ in objects:  # VOC pixels: 1-based, inclusive
        parts.append(f"<object><name>{label}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                     f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"
