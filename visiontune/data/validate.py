"""Reading every candidate file once: which decode, which do not and why, and data-set checks.

`scan` is used by `train` (to skip bad files before the first epoch, so no epoch can crash on
one) and by `check` (which adds duplicates, leakage, small images and imbalance on top).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageInfo, ImageLoadError, inspect_image
from visiontune.data.samples import Sample, SampleSet
from visiontune.data.sources import discover
from visiontune.data.splits import TooFewImagesError


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class ScanResult:
    readable: list[Sample]
    skipped: list[Skipped]
    info: dict[str, ImageInfo]  # by path, readable files only


def scan(samples: list[Sample], max_pixels: int, threads: int | None = None) -> ScanResult:
    """Decode every file (at draft scale) in a thread pool; Pillow releases the GIL while decoding."""
    threads = threads or min(8, (os.cpu_count() or 1) + 2)

    def inspect(sample: Sample) -> ImageInfo | Skipped:
        try:
            return inspect_image(sample.path, max_pixels)
        except ImageLoadError as exc:
            return Skipped(sample.path, str(exc))

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(inspect, samples))
    result = ScanResult([], [], {})
    for sample, outcome in zip(samples, outcomes):
        if isinstance(outcome, Skipped):
            result.skipped.append(outcome)
        else:
            result.readable.append(sample)
            result.info[sample.path] = outcome
    return result


@dataclass
class DataReport:
    """What `visiontune check` reports; `errors` would break or bias training, `warnings` might."""

    source: str
    root: str
    labels: list[str]
    counts: dict[str, dict[str, int]]  # label -> split -> readable images
    skipped: list[Skipped]
    duplicate_groups: list[list[str]]
    cross_split_duplicates: list[list[str]]
    small_images: list[dict]
    imbalance_ratio: float | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_data(
    data: str,
    label_regex: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 32,
) -> DataReport:
    """Everything `visiontune check` reports, on the split `train` would use with these options."""
    split_error = None
    try:
        sample_set = discover(data, label_regex, val_fraction, test_fraction, seed)
    except TooFewImagesError as exc:
        split_error = str(exc)
        sample_set = discover(data, label_regex, split=False)
    report = check_samples(sample_set, max_pixels, min_side)
    if split_error:
        report.errors.insert(0, split_error)
    return report


def check_samples(
    sample_set: SampleSet, max_pixels: int, min_side: int = 32, scanned: ScanResult | None = None
) -> DataReport:
    """The checks on a listed data set; `scanned` reuses a scan already made (training makes one)."""
    scanned = scanned or scan(sample_set.samples, max_pixels)
    labels = sample_set.labels
    counts: dict[str, dict[str, int]] = {label: {} for label in labels}
    for sample in scanned.readable:
        column = sample.split or "unsplit"
        counts[sample.label][column] = counts[sample.label].get(column, 0) + 1

    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for sample in scanned.readable:
        by_hash[scanned.info[sample.path].sha1].append(sample)
    groups = [g for g in by_hash.values() if len(g) > 1]
    crossing = [g for g in groups if len({s.split for s in g}) > 1]
    small = [
        {"path": s.path, "width": i.width, "height": i.height}
        for s in scanned.readable
        if min((i := scanned.info[s.path]).width, i.height) < min_side
    ]
    totals = Counter(s.label for s in scanned.readable)
    nonzero = [n for n in totals.values() if n > 0]
    ratio = max(nonzero) / min(nonzero) if nonzero else None

    report = DataReport(
        source=sample_set.source,
        root=sample_set.root,
        labels=[label for label in labels if totals[label] > 0],
        counts=counts,
        skipped=scanned.skipped,
        duplicate_groups=[[s.path for s in g] for g in groups],
        cross_split_duplicates=[[f"{s.split}:{s.path}" for s in g] for g in crossing],
        small_images=small,
        imbalance_ratio=ratio,
    )
    _judge(report, sample_set, totals, min_side)
    return report


def _judge(report: DataReport, sample_set: SampleSet, totals: Counter, min_side: int) -> None:
    errors, warnings = report.errors, report.warnings
    for name in sample_set.empty_classes:
        errors.append(f"class folder '{name}' has no images")
    for label in report.counts:
        if totals[label] == 0:
            errors.append(f"class '{label}' has no readable images")
    if len(report.labels) < 2:
        errors.append(f"at least 2 classes with readable images are needed, found {len(report.labels)}")
    for label in report.labels:
        if "unsplit" in report.counts[label]:
            continue  # the split itself failed; that error is already reported
        missing = [split for split in ("train", "val") if not report.counts[label].get(split)]
        if missing:
            errors.append(f"class '{label}' has no images in {' or '.join(missing)}")
    if report.cross_split_duplicates:
        errors.append(
            f"{len(report.cross_split_duplicates)} identical image(s) appear in more than one split "
            "(leakage: evaluation would be optimistic)"
        )
    if report.skipped:
        warnings.append(f"{len(report.skipped)} unreadable file(s) will be skipped")
    within = len(report.duplicate_groups) - len(report.cross_split_duplicates)
    if within:
        warnings.append(f"{within} group(s) of identical images within a split")
    if report.small_images:
        warnings.append(f"{len(report.small_images)} image(s) smaller than {min_side}px on a side")
    if report.imbalance_ratio and report.imbalance_ratio >= 3:
        warnings.append(
            f"class imbalance {report.imbalance_ratio:.1f}:1; consider --balance sampler or weights"
        )
    warnings.extend(sample_set.notes)
