"""Captioned images from a CSV (`image,caption[,split]`, several rows per image) or a COCO-style
captions JSON, split by image: every caption of an image lands in the same split, so no image is
trained on and evaluated.

Bad rows are reported, not fatal: a missing image file or an empty caption is dropped and counted;
a file that is not UTF-8, a CSV without the two columns, an image given two splits or too few
images to split stop with one message.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class CaptionSet:
    """Images (absolute paths) with their captions and split, plus what was dropped and why."""

    images: list[str]
    captions: list[list[str]]
    splits: list[str]
    dropped: list[dict] = field(default_factory=list)  # {"image", "reason"}

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def rows(self) -> list[dict]:
        """One row per caption, as `captions.csv` of a run (itself a valid source)."""
        return [{"image": image, "caption": caption, "split": split}
                for image, captions, split in zip(self.images, self.captions, self.splits) for caption in captions]


def read_captions(source: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> CaptionSet:
    """Read `source` and split its images (seeded) unless the rows give their split."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"captions file not found: {path} (give a CSV with image,caption columns or a COCO "
                        "captions JSON)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                        "save it as UTF-8") from None
    rows = _coco_rows(path, text) if path.suffix.lower() == ".json" else _csv_rows(path, text)
    grouped: dict[str, list[str]] = defaultdict(list)
    given_split: dict[str, set[str]] = defaultdict(set)
    dropped: list[dict] = []
    for image, caption, split in rows:
        full = str((path.parent / image).resolve()) if image else ""
        if not image:
            dropped.append({"image": "", "reason": "no image name"})
        elif not " ".join(caption.split()):
            dropped.append({"image": full, "reason": "empty caption"})
        elif not Path(full).is_file():
            dropped.append({"image": full, "reason": "image file not found"})
        else:
            grouped[full].append(" ".join(caption.split()))
            if split:
                given_split[full].add(split)
    return _split(path, grouped, given_split, dropped, val_fraction, test_fraction, seed)


def _csv_rows(path: Path, text: str) -> list[tuple[str, str, str]]:
    reader = csv.DictReader(text.splitlines())
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    if "image" not in columns or "caption" not in columns:
        raise UserError(f"{path} needs a header with 'image' and 'caption' columns (and optionally 'split'); "
                        f"it has: {', '.join(reader.fieldnames or []) or 'no header'}")
    try:
        return [((row.get(columns["image"]) or "").strip(), row.get(columns["caption"]) or "",
                 (row.get(columns.get("split", ""), "") or "").strip().lower()) for row in reader]
    except csv.Error as exc:
        raise UserError(f"{path} is not a readable CSV file: {exc}") from None


def _coco_rows(path: Path, text: str) -> list[tuple[str, str, str]]:
    """COCO captions: `images` [{id, file_name}] and `annotations` [{image_id, caption}]."""
    try:
        raw = json.loads(text)
        names = {image["id"]: image["file_name"] for image in raw["images"]}
        return [(names.get(a["image_id"], ""), str(a.get("caption") or ""), "") for a in raw["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a COCO captions file (images [{{id, file_name}}], annotations "
                        f"[{{image_id, caption}}]): {type(exc).__name__}: {exc}") from None


def _split(path: Path, grouped: dict[str, list[str]], given: dict[str, set[str]], dropped: list[dict],
           val_fraction: float, test_fraction: float, seed: int) -> CaptionSet:
    twice = sorted(image for image, splits in given.items() if len(splits) > 1)
    if twice:
        raise UserError(f"{len(twice)} image(s) are given more than one split in {path}, so they would be trained on "
                        f"and evaluated: {', '.join(twice[:5])}")
    unknown = sorted({s for splits in given.values() for s in splits} - set(SPLITS))
    if unknown:
        raise UserError(f"unknown split name(s) {', '.join(unknown)} in {path}; use {', '.join(SPLITS)}")
    images = sorted(grouped)
    if len(images) < 3:
        raise UserError(f"{path} has {len(images)} usable captioned image(s) after dropping {len(dropped)} row(s); "
                        "captioning needs at least 3 (train, val and test)")
    if given and len(given) == len(images):
        splits = [next(iter(given[image])) for image in images]
    else:
        order = np.random.default_rng(seed).permutation(len(images))
        n_val = max(1, round(val_fraction * len(images)))
        n_test = round(test_fraction * len(images))
        splits = ["train"] * len(images)
        for rank, i in enumerate(order):
            splits[i] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    for needed in ("train", "val"):
        if needed not in splits:
            raise UserError(f"{path} has no {needed} images; give some rows split={needed}, or none a split")
    return CaptionSet(images, [grouped[image] for image in images], splits, dropped)
