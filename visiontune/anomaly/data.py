"""Image folders for anomaly detection: good images to fit on, labelled sets to evaluate, masks.

Two layouts are read for evaluation (and, without the good folder, for validation defect images):
- MVTec AD: `ROOT/test/good/`, `ROOT/test/<defect type>/`, masks `ROOT/ground_truth/<type>/<name>_mask.png`.
- plain: `ROOT/good/`, `ROOT/<defect type>/`, masks as same-name images in a parallel folder
  `ROOT/masks/<type>/` (or `ROOT/ground_truth/<type>/`).
A mask is matched by file stem, with or without a `_mask` suffix and with any image extension.
Masks are binarised after resizing to the model's input size: a pixel is defective when its grey
value, bilinearly resized, is at least half of full scale (>= 127.5 of 255); soft mask edges
thus count where they are more than half on. A defect image whose mask is empty still counts as
anomalous for image-level metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from visiontune.data.images import load_rgb
from visiontune.data.sources import list_image_files
from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError

GOOD = "good"
MASK_FOLDERS = ("ground_truth", "masks")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    defect: str  # GOOD or the defect type (its folder name)
    mask: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.defect != GOOD


def good_images(path: str | Path) -> list[Path]:
    """The images of a folder of good images, or of an MVTec AD category's `train/good`."""
    folder = _existing_folder(path)
    if (folder / "train" / GOOD).is_dir():
        folder = folder / "train" / GOOD
    files = list_image_files(folder)
    if not files:
        raise UserError(f"no images found in {folder}")
    return files


def labelled_images(root: str | Path) -> list[LabelledImage]:
    """Good and defect images with their masks, from either layout (see the module docstring)."""
    root = _existing_folder(root)
    images_root, types = _type_folders(root)
    if GOOD not in types or len(types) < 2:
        raise UserError(
            f"{root} needs a '{GOOD}' folder and at least one defect folder beside it "
            f"(found: {', '.join(types) or 'none'}); expected ROOT/test/good + ROOT/test/<type> "
            "(MVTec AD) or ROOT/good + ROOT/<type>"
        )
    images = _images_of_types(root, images_root, types)
    if not any(image.is_anomalous for image in images) or all(image.is_anomalous for image in images):
        raise UserError(f"{root} needs both good and defect images")
    return images


def defect_images(path: str | Path) -> list[LabelledImage]:
    """Labelled defect images that set a threshold (`--val-defects`): a folder of images of one
    type, named after the folder, or a folder of defect-type folders with their masks as in
    `labelled_images`; mask folders are never read as defect images."""
    root = _existing_folder(path)
    images_root, types = _type_folders(root)
    if GOOD in types:
        raise UserError(f"{root} holds a '{GOOD}' folder: validation defects are defect images only "
                        "(the good images behind the threshold come from the fit); pass its defect folders")
    loose = [LabelledImage(p, root.name) for p in list_image_files(images_root) if p.parent == images_root]
    images = loose + _images_of_types(root, images_root, types)
    if not images:
        raise UserError(f"no images found in {root}")
    return images


def _type_folders(root: Path) -> tuple[Path, list[str]]:
    """The folder holding the image folders (ROOT/test in MVTec AD, else ROOT) and their names."""
    images_root = root / "test" if (root / "test").is_dir() else root
    return images_root, [d.name for d in sorted(images_root.iterdir())
                         if d.is_dir() and not d.name.startswith(".") and d.name not in MASK_FOLDERS + ("train",)]


def _images_of_types(root: Path, images_root: Path, types: list[str]) -> list[LabelledImage]:
    images = []
    for defect in types:
        masks = _masks_by_stem(root, defect)
        images += [LabelledImage(p, defect, masks.get(p.stem)) for p in list_image_files(images_root / defect)]
    return images


def _masks_by_stem(root: Path, defect: str) -> dict[str, Path]:
    masks = {}
    for name in MASK_FOLDERS:
        folder = root / name / defect
        if folder.is_dir():
            masks.update({p.stem.removesuffix("_mask"): p for p in list_image_files(folder)})
    return masks


def _existing_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"not a folder: {path}")
    return folder


def anomaly_transform(preprocessing: Preprocessing) -> v2.Compose:
    """Resize to a square of the input size, no crop: defects at the border stay in view and the
    map lines up with the whole image and its mask."""
    size = preprocessing.input_size
    mode = InterpolationMode(preprocessing.interpolation if preprocessing.interpolation != "random" else "bilinear")
    return v2.Compose([
        v2.ToImage(), v2.Resize((size, size), interpolation=mode, antialias=True),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocessing.mean, preprocessing.std),
    ])


def load_mask(path: Path, size: int, max_pixels: int) -> np.ndarray:
    """Boolean [size, size] mask by the binarisation rule above; raises ImageLoadError."""
    grey = load_rgb(path, max_pixels).convert("L")
    resized = grey.convert("F").resize((size, size), Image.BILINEAR)
    return np.asarray(resized) >= 127.5
