"""Reviewed audit decisions applied to a data source before training: `--exclude FILE` drops the
images a CSV's `path` column lists, `--relabel FILE` gives the images in its `path` column the
class in its `label` column (or `suggested_label`, as `audit`'s findings.csv names it). Paths are
resolved against the CSV's folder; the data on disk is never changed, the run records the changes."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from visiontune.data.samples import Sample
from visiontune.errors import UserError


def _rows(csv_path: str | Path, columns: tuple[str, ...]) -> list[dict]:
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in found or not any(c in found for c in columns):
            raise UserError(f"{path} needs a header with 'path'" + (f" and one of {', '.join(columns)}" if columns else ""))
        rows = []
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if row.get("path"):
                file = Path(row["path"]).expanduser()
                row["path"] = str((file if file.is_absolute() else path.parent / file).resolve())
                rows.append(row)
    return rows


def curate(samples: list[Sample], exclude: str | None, relabel: str | None) -> tuple[list[Sample], dict]:
    """`samples` less the excluded ones, relabelled; and the record of what changed (for summary.json)."""
    record = {"exclude_file": exclude, "relabel_file": relabel, "excluded": [], "relabelled": [], "not_found": []}
    if exclude is None and relabel is None:
        return samples, record
    known = {s.path for s in samples}
    dropped = {row["path"] for row in _rows(exclude, ("path",))} if exclude else set()
    labels = {s.label for s in samples}
    new_label = {}
    for row in _rows(relabel, ("label", "suggested_label")) if relabel else []:
        label = row.get("label") or row.get("suggested_label", "")
        if label not in labels:
            raise UserError(f"{relabel}: '{label}' (for {row['path']}) is not a class of the data "
                            f"({', '.join(sorted(labels))})")
        new_label[row["path"]] = label
    record["not_found"] = sorted((dropped | set(new_label)) - known)
    kept = []
    for sample in samples:
        if sample.path in dropped:
            record["excluded"].append(sample.path)
        elif new_label.get(sample.path, sample.label) != sample.label:
            record["relabelled"].append({"path": sample.path, "from": sample.label, "to": new_label[sample.path]})
            kept.append(dataclasses.replace(sample, label=new_label[sample.path]))
        else:
            kept.append(sample)
    return kept, record
