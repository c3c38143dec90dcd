"""Seeded, stratified train/val/test splits and the `splits.csv` that records them."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from visiontune.data.samples import Sample
from visiontune.errors import UserError
from visiontune.io import write_csv_atomic

SPLITS = ("train", "val", "test")


class TooFewImagesError(UserError):
    """A class has too few images for every split to get one."""


def stratified_split(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int
) -> list[Sample]:
    """Split each class on its own so every split keeps the class proportions.

    Each class puts round(n * fraction) images, at least one, into val and test (when their
    fraction is non-zero) and keeps at least one for training; a class too small for that is an
    error naming the class, rather than a split that silently lacks it.
    """
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.path):
        by_label[sample.label].append(sample)
    rng = random.Random(seed)
    out: list[Sample] = []
    too_small = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val, n_test = split_sizes(len(group), val_fraction, test_fraction)
        if len(group) - n_val - n_test < 1:
            too_small.append(f"'{label}' ({len(group)})")
            continue
        out += [replace(s, split="val") for s in group[:n_val]]
        out += [replace(s, split="test") for s in group[n_val : n_val + n_test]]
        out += [replace(s, split="train") for s in group[n_val + n_test :]]
    if too_small:
        need = 1 + (val_fraction > 0) + (test_fraction > 0)
        raise TooFewImagesError(
            f"too few images to split class(es) {', '.join(too_small)}: each class needs at least "
            f"{need} to appear in every split; add images, or lower --val-fraction/--test-fraction"
        )
    return out


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    return n_val, n_test


def canonical_order(samples: list[Sample]) -> list[Sample]:
    """One order for a given split, whatever the source listed first: same split, same run."""
    return sorted(samples, key=lambda s: (SPLITS.index(s.split) if s.split else -1, s.label, s.path))


def write_splits_csv(samples: list[Sample], path: Path) -> None:
    """Absolute paths, so the file is itself a CSV data source that reproduces the run exactly."""
    rows = [[sample.path, sample.label, sample.split] for sample in canonical_order(samples)]
    write_csv_atomic(path, ["path", "label", "split"], rows)
