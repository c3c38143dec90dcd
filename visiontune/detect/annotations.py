"""Boxes from the four formats people have them in (COCO JSON, Pascal VOC XML, YOLO txt, masks),
parsed into one `DetectionSet`, and the split by image both detection methods train on.

A bad annotation is one `AnnotationProblem` (listed in the run's summary.json), never fatal: a box
partly outside its image is clipped, one wholly outside or without area is dropped, as are unknown
classes, unparseable lines and files, and images that are missing or unreadable. Only a wrong path
or a source with nothing usable at all stops here (one UserError). Boxes are in the image as
decoded with its EXIF rotation, so sizes come from the oriented image, never from the file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import ParseError

import defusedxml.ElementTree as SafeET
import numpy as np
import yaml
from defusedxml import DefusedXmlException
from PIL import Image, ImageOps
from scipy import ndimage

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, inspect_image, is_image_file
from visiontune.data.sources import list_image_files
from visiontune.detect.types import AnnotationProblem, DetectionSet, ImageTargets
from visiontune.errors import UserError

FORMATS = ("auto", "coco", "voc", "yolo", "masks")
SPLITS = ("train", "val", "test")
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DEFAULT_MASK_CLASS = "object"
SHOWN_PROBLEMS = 3  # in the message when nothing was usable


@dataclass
class _Box:
    """One raw annotation before it is checked against its image."""

    label: str | int  # a class name, or an index into the class list (YOLO)
    box: tuple[float, float, float, float]  # xyxy pixels
    source: str


def load_annotations(annotations: str | Path, images: str | Path, fmt: str = "auto", *, min_area: float = 1.0,
                     classes: list[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DetectionSet:
    """The boxes of `annotations` (a COCO JSON file, or a folder of VOC .xml, YOLO .txt or mask
    images) for the images under `images`. `classes` fixes the class order (others become
    problems); `min_area` (pixels) drops smaller mask components."""
    annotations, images = Path(annotations).expanduser(), Path(images).expanduser()
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not annotations.exists():
        raise UserError(f"no such annotation file or folder: {annotations}")
    if not images.is_dir():
        raise UserError(f"no such image folder: {images}")
    fmt = detect_format(annotations) if fmt == "auto" else fmt
    if fmt == "coco" and not annotations.is_file() or fmt != "coco" and not annotations.is_dir():
        raise UserError(f"{annotations}: {fmt} annotations are {'a JSON file' if fmt == 'coco' else 'a folder'}")
    problems: list[AnnotationProblem] = []
    parse = {"coco": _parse_coco, "voc": _parse_voc, "yolo": _parse_yolo, "masks": _parse_masks}[fmt]
    names, boxes = parse(annotations, _ImageIndex(images), classes, min_area, problems)
    dataset = _checked(names, boxes, problems, max_pixels)
    if not dataset.images or not any(len(t.boxes) for t in dataset.images):
        shown = "; ".join(f"{p.source}: {p.reason}" for p in problems[:SHOWN_PROBLEMS])
        raise UserError(f"nothing usable in {annotations} ({fmt}) for the images in {images}: "
                        f"{len(dataset.images)} images, no box{f' ({shown})' if shown else ''}")
    return dataset


def detect_format(annotations: Path) -> str:
    """coco for a .json file; for a folder, voc if it holds .xml, yolo if .txt, masks if images."""
    if annotations.is_file():
        if annotations.suffix.lower() == ".json":
            return "coco"
        raise UserError(f"{annotations}: cannot tell the annotation format of a {annotations.suffix or 'suffix-less'} "
                        "file; COCO annotations are a .json file, the others a folder (or pass --format)")
    files = [p for p in annotations.rglob("*") if p.is_file() and not p.name.startswith(".")]
    suffixes = {p.suffix.lower() for p in files}
    if ".xml" in suffixes:
        return "voc"
    if ".txt" in suffixes:
        return "yolo"
    if any(is_image_file(p) for p in files):
        return "masks"
    raise UserError(f"{annotations} holds no .xml (VOC), .txt (YOLO) or mask images; pass --format")


def split_detection_set(dataset: DetectionSet, val_fraction: float = 0.2, test_fraction: float = 0.2,
                        seed: int = 0) -> dict[str, list[ImageTargets]]:
    """train / val / test by image, seeded. Images that all live under train/ val/ test/ folders
    keep that split (val, when missing, is drawn from train)."""
    explicit = _explicit_splits(dataset.images)
    if explicit is not None:
        if not explicit["val"]:
            explicit["train"], explicit["val"] = _draw(explicit["train"], val_fraction, seed)
        return explicit
    rest, test = _draw(dataset.images, test_fraction, seed)
    train, val = _draw(rest, val_fraction / max(1e-9, 1 - test_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}


def _draw(images: list[ImageTargets], fraction: float, seed: int) -> tuple[list[ImageTargets], list[ImageTargets]]:
    """(rest, drawn): `fraction` of the images, at least one when there are three or more."""
    n = len(images)
    k = min(n - 1, max(int(round(n * fraction)), 1 if n >= 3 and fraction > 0 else 0)) if n else 0
    order = np.random.default_rng(seed).permutation(n)
    drawn = set(order[:k].tolist())
    return [t for i, t in enumerate(images) if i not in drawn], [t for i, t in enumerate(images) if i in drawn]


def _explicit_splits(images: list[ImageTargets]) -> dict[str, list[ImageTargets]] | None:
    if len(images) < 2:
        return None
    root = Path(os.path.commonpath([str(t.path.parent) for t in images]))
    firsts = [t.path.relative_to(root).parts[0] if len(t.path.relative_to(root).parts) > 1 else None for t in images]
    if not all(first in SPLITS for first in firsts) or "train" not in firsts:
        return None
    return {split: [t for t, first in zip(images, firsts) if first == split] for split in SPLITS}


# --- the formats ------------------------------------------------------------------------------------

def _parse_coco(path: Path, images: _ImageIndex, classes, min_area, problems) -> tuple[list[str], dict[Path, list[_Box]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} is not COCO detection JSON (no 'images' list)")
    category_names: dict[int, str] = {}
    for k, category in enumerate(data.get("categories") or []):
        try:
            category_names[int(category["id"])] = str(category["name"])
        except (KeyError, TypeError, ValueError):
            problems.append(AnnotationProblem(f"{path.name}: categories[{k}]", "no integer id and name"))
    names = list(classes) if classes else [category_names[i] for i in sorted(category_names)]
    files: dict[int, Path] = {}
    boxes: dict[Path, list[_Box]] = {}
    for k, image in enumerate(data["images"]):
        try:
            files[int(image["id"])] = images.root / str(image["file_name"])
        except (KeyError, TypeError, ValueError):
            problems.append(AnnotationProblem(f"{path.name}: images[{k}]", "no integer id and file_name"))
            continue
        boxes.setdefault(files[int(image["id"])], [])
    for k, annotation in enumerate(data.get("annotations") or []):
        source = f"{path.name}: annotations[{k}]"
        try:
            image_id, category = int(annotation["image_id"]), int(annotation["category_id"])
            x, y, w, h = (float(v) for v in annotation["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.append(AnnotationProblem(source, "not an image_id, category_id and bbox [x, y, w, h]"))
            continue
        if image_id not in files:
            problems.append(AnnotationProblem(source, f"image_id {image_id} is not in 'images'"))
            continue
        if category not in category_names:
            problems.append(AnnotationProblem(source, f"unknown class: category_id {category}"))
            continue
        boxes[files[image_id]].append(_Box(category_names[category], (x, y, x + w, y + h), source))
    return names, boxes


def _parse_voc(folder: Path, images: _ImageIndex, classes, min_area, problems) -> tuple[list[str], dict[Path, list[_Box]]]:
    boxes: dict[Path, list[_Box]] = {path: [] for path in images.files}  # unannotated: background
    for xml in sorted(folder.rglob("*.xml")):
        source = str(xml.relative_to(folder))
        try:
            root = SafeET.parse(xml).getroot()
        except (ParseError, DefusedXmlException, OSError, UnicodeDecodeError) as exc:
            problems.append(AnnotationProblem(source, f"unreadable XML: {type(exc).__name__}: {exc}"))
            continue
        image = _voc_image(root.findtext("filename"), xml, folder, images)
        if image is None:
            problems.append(AnnotationProblem(source, f"missing image: {root.findtext('filename') or xml.stem}"))
            continue
        found = boxes.setdefault(image, [])
        for k, obj in enumerate(root.iter("object")):
            where = f"{source}: object {k + 1}"
            try:
                name = (obj.findtext("name") or "").strip()
                box = obj.find("bndbox")
                x1, y1, x2, y2 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                problems.append(AnnotationProblem(where, "no name and numeric bndbox xmin ymin xmax ymax"))
                continue
            # VOC pixels are 1-based and inclusive: pixel 1 spans [0, 1)
            found.append(_Box(name, (x1 - 1, y1 - 1, x2, y2), where))
    names = list(classes) if classes else sorted({b.label for bs in boxes.values() for b in bs})
    return names, boxes


def _voc_image(filename: str | None, xml: Path, folder: Path, images: _ImageIndex) -> Path | None:
    relative = xml.relative_to(folder).parent
    candidates = [images.root / filename, images.root / relative / filename] if filename else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return images.match(relative / xml.stem)


def _parse_yolo(folder: Path, images: _ImageIndex, classes, min_area, problems) -> tuple[list[str], dict[Path, list[_Box]]]:
    names = list(classes) if classes else _yolo_names(folder)
    boxes: dict[Path, list[_Box]] = {path: [] for path in images.files}  # unannotated: background
    for txt in sorted(folder.rglob("*.txt")):
        if txt.name == "classes.txt":
            continue
        source = str(txt.relative_to(folder))
        image = images.match(txt.relative_to(folder).with_suffix(""))
        if image is None:
            problems.append(AnnotationProblem(source, "missing image: none with this name"))
            continue
        size = _oriented_size(image)
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(AnnotationProblem(source, f"unreadable: {exc}"))
            continue
        found = boxes.setdefault(image, [])
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{source}:{number}"
            try:
                label, cx, cy, w, h = line.split()
                index = int(label)
                cx, cy, w, h = float(cx), float(cy), float(w), float(h)
            except ValueError:
                problems.append(AnnotationProblem(where, f"not 'class cx cy w h': {line.strip()[:60]!r}"))
                continue
            if size is None:
                break  # the image is unreadable: _checked lists it once
            width, height = size
            found.append(_Box(index, ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                      (cy + h / 2) * height), where))
    return names, boxes


def _yolo_names(folder: Path) -> list[str]:
    for directory in (folder, folder.parent):
        if (directory / "classes.txt").is_file():
            return [line.strip() for line in (directory / "classes.txt").read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        if (directory / "data.yaml").is_file():
            try:
                names = (yaml.safe_load((directory / "data.yaml").read_text(encoding="utf-8")) or {}).get("names")
            except (yaml.YAMLError, AttributeError) as exc:
                raise UserError(f"{directory / 'data.yaml'} is not a YAML mapping with 'names': {exc}") from None
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise UserError(f"{directory / 'data.yaml'} has no 'names' list")
    raise UserError(f"YOLO labels in {folder} need class names: a classes.txt or data.yaml beside them, "
                    "or give the classes (--classes a,b,...)")


def _parse_masks(folder: Path, images: _ImageIndex, classes, min_area, problems) -> tuple[list[str], dict[Path, list[_Box]]]:
    """One mask per image (same stem), nonzero = object, one box per connected component (8-connected);
    class sub-folders (masks/crack/x.png) name the class, a flat folder is one class."""
    sub_folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(p.name, p) for p in sub_folders] if sub_folders else [
        ((classes or [DEFAULT_MASK_CLASS])[0], folder)]
    boxes: dict[Path, list[_Box]] = {path: [] for path in images.files}  # unannotated: background
    for name, group in groups:
        for mask_path in list_image_files(group):
            source = str(mask_path.relative_to(folder))
            image = images.match(mask_path.relative_to(group).with_suffix(""))
            if image is None:
                problems.append(AnnotationProblem(source, "missing image: none with this name"))
                continue
            try:
                with Image.open(mask_path) as mask_file:
                    mask = np.asarray(ImageOps.exif_transpose(mask_file))
            except (OSError, ValueError, SyntaxError) as exc:
                problems.append(AnnotationProblem(source, f"unreadable mask: {exc}"))
                continue
            mask = mask.any(axis=-1) if mask.ndim == 3 else mask != 0
            components, count = ndimage.label(mask, structure=np.ones((3, 3)))
            areas = np.bincount(components.ravel(), minlength=count + 1)
            found = boxes.setdefault(image, [])
            for k, region in enumerate(ndimage.find_objects(components), 1):
                where = f"{source}: component {k}"
                if areas[k] < min_area:
                    problems.append(AnnotationProblem(where, f"{areas[k]} pixels, under min_area {min_area:g}"))
                    continue
                rows, cols = region
                found.append(_Box(name, (cols.start, rows.start, cols.stop, rows.stop), where))
    names = list(classes) if classes else [name for name, _ in groups]
    return names, boxes


# --- shared checks ------------------------------------------------------------------------------------

class _ImageIndex:
    """The images of the folder, found by their path without suffix or, when unique, their stem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = list_image_files(root)
        index: dict[str, list[Path]] = defaultdict(list)
        for path in self.files:
            index[str(path.relative_to(root).with_suffix(""))].append(path)
            if path.parent != root:
                index[path.stem].append(path)
        self._index = {key: paths[0] for key, paths in index.items() if len(paths) == 1}

    def match(self, relative_stem: Path) -> Path | None:
        return self._index.get(str(relative_stem)) or self._index.get(relative_stem.name)


def _oriented_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) of the image as decoded with its EXIF rotation; None when unreadable."""
    try:
        info = inspect_image(path, max_pixels)
        with Image.open(path) as img:
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (ImageLoadError, OSError):
        return None
    return (info.height, info.width) if orientation in TRANSPOSED else (info.width, info.height)


def _checked(names: list[str], boxes: dict[Path, list[_Box]], problems: list[AnnotationProblem],
             max_pixels: int) -> DetectionSet:
    """Images that can be read, with their boxes clipped to the image and checked."""
    index = {name: i for i, name in enumerate(names)}
    targets = []
    for path, raw in sorted(boxes.items()):
        size = _oriented_size(path, max_pixels) if path.is_file() else None
        reason = "unreadable image" if path.is_file() else "missing image"
        if size is None:
            problems.append(AnnotationProblem(str(path), f"{reason}: its {len(raw)} box(es) dropped"))
            continue
        width, height = size
        kept, labels = [], []
        for box in raw:
            label = box.label if isinstance(box.label, int) else index.get(box.label)
            if label is None or not 0 <= label < len(names):
                problems.append(AnnotationProblem(box.source, f"unknown class: {box.label!r}"))
                continue
            x1, y1, x2, y2 = box.box
            if not all(np.isfinite(box.box)) or x2 <= x1 or y2 <= y1:
                problems.append(AnnotationProblem(box.source, f"zero or negative area: {_fmt(box.box)}"))
                continue
            clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                problems.append(AnnotationProblem(box.source, f"box outside the {width}x{height} image: {_fmt(box.box)}"))
                continue
            if clipped != tuple(map(float, box.box)):
                problems.append(AnnotationProblem(box.source, f"box partly outside the {width}x{height} image: "
                                                  f"clipped {_fmt(box.box)} to {_fmt(clipped)}"))
            kept.append(clipped)
            labels.append(label)
        targets.append(ImageTargets(path, width, height, np.array(kept, dtype=np.float32).reshape(-1, 4), labels))
    return DetectionSet(list(names), targets, problems)


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
