"""The target domain's images and labels, read so that no target test image is ever opened.

A target folder may be plain (every image in it, class sub-folders or not) or a split folder
(train/ val/ test/): its test images are counted and left out, and its val images, when there
are any, are the held-out images that score each epoch; otherwise a seeded fifth is held out.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.data.samples import Sample
from visiontune.data.sources import VAL_DIR_NAMES, discover, list_image_files
from visiontune.data.validate import Skipped, scan
from visiontune.errors import UserError

HELD_OUT_FRACTION = 0.2
MAX_REASONS = 5  # unreadable files named in one message


@dataclass
class TargetImages:
    """Readable target images outside the test split: `adapt` is adapted on, `held_out` only scored."""

    adapt: list[str]
    held_out: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    test_left_out: int = 0  # listed, never opened

    @property
    def all(self) -> list[str]:
        return self.adapt + self.held_out


@dataclass
class LabelledTarget:
    """Labelled target images outside the test split: `train` trains, `val` chooses the epoch."""

    train: list[Sample]
    val: list[Sample]
    val_source: str  # where `val` came from, for the summary
    skipped: list[Skipped] = field(default_factory=list)
    test_left_out: int = 0


def read_target(path: str | Path, max_pixels: int, seed: int) -> TargetImages:
    """The target images of `path` (a folder or a CSV file), split into adapted-on and held-out."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"target path does not exist: {root}")
    train, val, test = _target_files(root.resolve())
    if not train and not val:
        left_out = f" ({test} test image(s) are never used for adaptation)" if test else ""
        raise UserError(f"no target images found in {root}{left_out}")
    readable, skipped = _readable(train + val, max_pixels, f"target images in {root}")
    if len(readable) < 2:
        raise UserError(f"adaptation needs at least 2 readable target images outside test; {root} has {len(readable)}")
    held_out = [p for p in val if p in readable]
    adapt = [p for p in train if p in readable]
    if not held_out or not adapt:  # no val/ folder (or one of the two parts is empty): hold out a seeded share
        pool = sorted(readable)
        random.Random(seed).shuffle(pool)
        n = max(1, round(len(pool) * HELD_OUT_FRACTION))
        held_out, adapt = sorted(pool[:n]), sorted(pool[n:])
    return TargetImages(adapt, held_out, skipped, test)


def read_target_labels(
    path: str | Path, labels: list[str], shots: int | None, max_pixels: int, seed: int,
) -> LabelledTarget:
    """Labelled target images (class folders, split folders or a CSV file), `shots` per class drawn
    seeded from those outside val and test; the validation images are the val split, if any."""
    found = discover(path, split=False).samples
    test = [s for s in found if s.split == "test"]
    usable = [s for s in found if s.split != "test"]
    unknown = sorted({s.label for s in found} - set(labels))
    if unknown:
        raise UserError(f"{path} has class(es) the source run never had: {', '.join(unknown)} "
                        f"(the run's classes: {', '.join(labels)})")
    readable, skipped = _readable([s.path for s in usable], max_pixels, f"labelled target images in {path}")
    usable = [s for s in usable if s.path in readable]
    pool = [s for s in usable if s.split != "val"]
    val = [s for s in usable if s.split == "val"]
    if not pool:
        raise UserError(f"{path} has no readable labelled images outside its val and test splits to train on")
    val_source = "the labelled target val split" if val else "none"
    if shots is not None:  # the images not drawn stay unused: k labels per class means k, selection included
        pool = draw_shots(pool, shots, seed)
    return LabelledTarget(pool, val, val_source, skipped, len(test))


def draw_shots(samples: list[Sample], shots: int, seed: int) -> list[Sample]:
    """`shots` samples of every class present, drawn seeded; too few in a class is a UserError naming each."""
    if shots < 1:
        raise UserError(f"--shots must be at least 1, not {shots}")
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.path):
        by_label[sample.label].append(sample)
    short = [f"{label} ({len(group)})" for label, group in sorted(by_label.items()) if len(group) < shots]
    if short:
        raise UserError(f"--shots {shots} is more than the labelled target images available outside val and test "
                        f"for class(es): {', '.join(short)}")
    rng = random.Random(seed)
    return [sample for label in sorted(by_label) for sample in rng.sample(by_label[label], shots)]


def _target_files(root: Path) -> tuple[list[str], list[str], int]:
    """(train-like paths, val paths, number of test files) without opening any file."""
    if root.is_file():
        samples = discover(root, split=False).samples
        paths = lambda split: [s.path for s in samples if s.split == split]
        return paths("train") + paths(""), paths("val"), len(paths("test"))
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    val_dir = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)
    if "train" in subdirs and (val_dir is not None or "test" in subdirs):
        listed = lambda folder: [str(p) for p in list_image_files(folder)] if folder else []
        return listed(subdirs["train"]), listed(val_dir), len(listed(subdirs.get("test")))
    return [str(p) for p in list_image_files(root)], [], 0


def _readable(paths: list[str], max_pixels: int, what: str) -> tuple[set[str], list[Skipped]]:
    """The paths that decode, and the reasons of those that do not; none readable is a UserError."""
    scanned = scan([Sample(p, "", "") for p in paths], max_pixels)
    if paths and not scanned.readable:
        reasons = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in scanned.skipped[:MAX_REASONS])
        raise UserError(f"none of the {len(paths)} {what} could be read ({reasons})")
    return {s.path for s in scanned.readable}, scanned.skipped
