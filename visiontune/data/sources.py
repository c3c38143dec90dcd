"""Where samples come from: class folders, split folders, a CSV file, or labels in file names.

`discover` is the one entry point. It returns every candidate sample with its label and split;
whether each file actually decodes is decided later, by `visiontune.data.validate.scan`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from visiontune.data.images import is_image_file
from visiontune.data.samples import Sample, SampleSet
from visiontune.data.splits import SPLITS, canonical_order, stratified_split
from visiontune.errors import UserError

VAL_DIR_NAMES = ("val", "valid", "validation")
MAX_LISTED = 20  # files named in one error message


def discover(
    data: str | Path,
    label_regex: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    split: bool = True,
) -> SampleSet:
    """List the samples of `data`, choosing the layout from what is there.

    With `split=False` samples without a given split keep split "" (used by `check` to report
    classes too small to split instead of stopping at them).
    """
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data path does not exist: {root}")
    root = root.resolve()
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UserError(f"{root} is a file but not a .csv; pass an image folder or a CSV file")
        found = _from_csv(root)
    elif label_regex:
        found = _from_regex(root, label_regex)
    else:
        found = _from_folders(root)
    if not found.samples:
        empty = f" (empty class folders: {', '.join(found.empty_classes)})" if found.empty_classes else ""
        raise UserError(f"no images found in {root}{empty}")
    if split:
        found.samples = _assign_splits(found.samples, val_fraction, test_fraction, seed)
    found.samples = canonical_order(found.samples)
    return found


def _from_folders(root: Path) -> SampleSet:
    subdirs = {p.name.lower(): p for p in _visible_dirs(root)}
    val_dir = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)
    if "train" in subdirs and (val_dir is not None or "test" in subdirs):
        parts = {"train": subdirs["train"], "val": val_dir, "test": subdirs.get("test")}
        found = SampleSet([], "split_folders", str(root))
        for split, folder in parts.items():
            if folder is None:
                continue
            listed = _class_folders(folder, split)
            found.samples += listed.samples
            found.empty_classes += [f"{split}/{c}" for c in listed.empty_classes]
        if val_dir is None:
            found.notes.append("no val/ folder: validation images are split off train/")
        return found
    return _class_folders(root, split="")


def _class_folders(folder: Path, split: str) -> SampleSet:
    classes = _visible_dirs(folder)
    if not classes:
        raise UserError(
            f"{folder} has no class sub-folders; expected one folder per class "
            "(or train/ and val/ folders of class folders, a CSV file, or --label-regex)"
        )
    found = SampleSet([], "folders", str(folder))
    for class_dir in classes:
        files = list_image_files(class_dir)
        if not files:
            found.empty_classes.append(class_dir.name)
        found.samples += [Sample(str(p), class_dir.name, split) for p in files]
    return found


def _from_csv(csv_path: Path) -> SampleSet:
    base = csv_path.parent
    found = SampleSet([], "csv", str(csv_path))
    rows: dict[str, list[tuple[int, Sample]]] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise UserError(f"{csv_path} needs a header with 'path' and 'label' (and optionally 'split')")
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("path") or not row.get("label"):
                raise UserError(f"{csv_path}, line {line_no}: empty path or label")
            split = _normalise_split(row.get("split", ""), f"{csv_path}, line {line_no}")
            path = Path(row["path"]).expanduser()
            path = path if path.is_absolute() else base / path
            rows.setdefault(str(path.resolve()), []).append((line_no, Sample(str(path.resolve()), row["label"], split)))
    found.samples, dropped = _one_row_per_file(rows, csv_path)
    if dropped:
        found.notes.append(f"{csv_path}: {dropped} repeated row(s) of the same file, label and split were dropped")
    return found


def _one_row_per_file(rows: dict[str, list[tuple[int, Sample]]], csv_path: Path) -> tuple[list[Sample], int]:
    """Each file once. Repeated identical rows are dropped (else the split could put one copy in train
    and one in val); a file under two labels or in two splits stops with the list of them."""
    kept, dropped, conflicts = [], 0, []
    for path, listed in rows.items():
        samples = {sample for _, sample in listed}
        if len(samples) > 1:
            lines = ", ".join(f"line {n}: {s.label}{'/' + s.split if s.split else ''}" for n, s in listed)
            conflicts.append(f"{path} ({lines})")
            continue
        kept.append(listed[0][1])
        dropped += len(listed) - 1
    if conflicts:
        shown = "; ".join(conflicts[:MAX_LISTED]) + (f"; and {len(conflicts) - MAX_LISTED} more" if len(conflicts) > MAX_LISTED else "")
        raise UserError(
            f"{csv_path} lists {len(conflicts)} file(s) under different labels or splits, so the same image "
            f"would be trained on and evaluated: {shown}. Keep one row per file"
        )
    return kept, dropped


def _from_regex(root: Path, pattern: str) -> SampleSet:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--label-regex {pattern!r} is not a valid regular expression: {exc}") from None
    if regex.groups == 0:
        raise UserError("--label-regex needs a group for the label, e.g. '_(\\d+)\\.' or '(?P<label>...)'")
    found = SampleSet([], "regex", str(root))
    unmatched = 0
    for path in list_image_files(root):
        match = regex.search(path.name)
        if not match:
            unmatched += 1
            continue
        label = match.group("label") if "label" in regex.groupindex else match.group(1)
        found.samples.append(Sample(str(path), label, ""))
    if unmatched:
        found.notes.append(f"{unmatched} image file(s) did not match --label-regex and were left out")
    return found


def _assign_splits(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int
) -> list[Sample]:
    """Keep splits given by the source; split what has none (stratified, seeded)."""
    given = {s.split for s in samples}
    if not given - {""}:
        return stratified_split(samples, val_fraction, test_fraction, seed)
    if "" in given:
        raise UserError("some rows have a split and some do not; give every row a split or none")
    if "train" not in given:
        raise UserError("the data has no training split")
    if "val" in given:
        return samples
    # train (+ test) given: carve validation images out of train only.
    train = [s for s in samples if s.split == "train"]
    others = [s for s in samples if s.split != "train"]
    carved = stratified_split(train, val_fraction, 0.0, seed)
    return carved + others


def _normalise_split(value: str, where: str) -> str:
    value = value.lower()
    if value in ("valid", "validation"):
        value = "val"
    if value and value not in SPLITS:
        raise UserError(f"{where}: split must be one of train, val, test (got {value!r})")
    return value


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_image_files(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, sorted; hidden files and folders left out.

    A symbolic link with an image name that leads nowhere (a loop, a missing target) is listed, so
    that the scan reports it with its reason instead of it vanishing without a word.
    """
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(folder).parts)  # noqa: E731
    dangling = lambda p: p.is_symlink() and not p.exists()  # noqa: E731
    return sorted(p for p in folder.rglob("*") if (p.is_file() or dangling(p)) and is_image_file(p) and not hidden(p))
