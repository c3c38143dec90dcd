"""`visiontune audit`: one frozen-backbone pass over a data source, then label issues,
near-duplicates (cross-split ones as leakage) and outliers, written to OUT/findings.csv,
OUT/findings.json and OUT/report.html. Only OUT is written; the user's images are only read."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from visiontune.audit import analysis as a
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, inspect_image, load_rgb
from visiontune.errors import UserError
from visiontune.features.extraction import SPLIT_DEFAULTS, build_extractor, list_inputs, plan_extraction
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.models.extractor import iter_features
from visiontune.reporting.html import render_page
from visiontune.reporting.images import data_uri

log = logging.getLogger(__name__)
FIELDS = ["kind", "rank", "path", "split", "given_label", "suggested_label", "score", "other_path", "other_split", "exact"]
KINDS = ("label_issue", "leakage", "near_duplicate", "outlier")
SHOWN_PER_KIND = 50  # thumbnails in the page; the CSV and JSON hold every finding
THUMB = 112


def audit(data, *, out: str | Path | None = None, model: str | None = None, run: str | Path | None = None,
          weights: str | Path | None = None, pretrained: bool = True, folds: int = 5,
          duplicate_similarity: float | None = None, image_size: int | None = None,
          label_regex: str | None = SPLIT_DEFAULTS["label_regex"],
          val_fraction: float = SPLIT_DEFAULTS["val_fraction"], test_fraction: float = SPLIT_DEFAULTS["test_fraction"],
          seed: int = SPLIT_DEFAULTS["seed"], batch_size: int = 32, workers: int | None = None,
          threads: int | None = None, device: str = "auto") -> dict:
    """Audit the labelled images of `data` (split as `train` splits it) and write OUT; returns findings.json's record."""
    started = time.perf_counter()
    duplicate_similarity = a.DUPLICATE_SIMILARITY if duplicate_similarity is None else duplicate_similarity
    if not isinstance(data, (str, Path)):
        raise UserError("audit needs a labelled data source: an image folder, split folder or CSV file")
    out_dir = Path(out).expanduser() if out else Path("audits") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir} already exists and is not an empty folder; choose another one")
    root = Path(data).expanduser().resolve()
    if root.is_dir() and out_dir.resolve().is_relative_to(root):
        raise UserError(f"--out {out_dir} is inside the data folder {root}; the audit writes nothing there")
    inputs = list_inputs(data, label_regex, val_fraction, test_fraction, seed)
    extractor, preprocessing = build_extractor(model, run, None, weights, pretrained, image_size, seed)
    torch_device, workers = plan_extraction(device, threads, workers)

    kept, skipped, rows = [], [], []
    for batch in iter_features(extractor, preprocessing.eval_transform(), inputs.paths, "avg", batch_size, workers,
                               torch_device):
        kept += batch.indices
        skipped += [{"path": inputs.paths[i], "reason": reason} for i, reason in batch.skipped]
        if batch.indices:
            rows.append(batch.arrays["features"])
    for row in skipped:
        log.warning("skipped %s: %s", row["path"], row["reason"])
    if not kept:
        raise UserError("none of the images could be read; see the skipped files")
    features_s = time.perf_counter() - started
    features = np.concatenate(rows)
    paths = [inputs.paths[i] for i in kept]
    splits = [inputs.splits[i] for i in kept]
    labels = inputs.labels[kept]
    classes = inputs.classes

    fold_result = a.out_of_fold_probabilities(features, labels, classes, folds, seed)
    issues = a.label_issues(labels, fold_result.pred_probs)
    findings = _label_findings(issues, labels, classes, paths, splits)
    findings += _duplicate_findings(a.near_duplicate_pairs(features, duplicate_similarity), paths, splits, labels,
                                    classes)
    scores, cutoff = a.outlier_scores(features)
    findings += _outlier_findings(scores, cutoff, paths, splits, labels, classes)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out_dir / "findings.csv", FIELDS, findings)
    counts = {kind: sum(f["kind"] == kind for f in findings) for kind in KINDS}
    record = {
        "data": str(data), "model": extractor.backbone, "run": str(run) if run is not None else None,
        "images": len(paths), "classes": classes, "folds": fold_result.folds, "warnings": fold_result.warnings,
        "oof_accuracy": float((fold_result.pred_probs.argmax(axis=1) == labels).mean()),
        "noise_rates": {name: float(rate) for name, rate in zip(classes, issues.noise_rates)},
        "settings": {"duplicate_similarity": duplicate_similarity, "outlier_neighbours": a.OUTLIER_NEIGHBOURS,
                     "outlier_cutoff": cutoff, "seed": seed},
        "counts": counts, "skipped": skipped, "findings": findings,
        "timings": {"features_s": round(features_s, 3), "total_s": round(time.perf_counter() - started, 3)},
    }
    write_text_atomic(out_dir / "findings.json", _json(record))
    render_page("audit.html", out_dir / "report.html", title="Data audit", record=record,
                groups=_groups(findings), shown=SHOWN_PER_KIND)
    record["out"] = str(out_dir)
    return record


def _label_findings(issues: a.LabelIssues, labels, classes, paths, splits) -> list[dict]:
    return [_row("label_issue", rank, paths[i], splits[i], classes[labels[i]], classes[suggested],
                 issues.quality[i])
            for rank, (i, suggested) in enumerate(zip(issues.indices, issues.suggested), start=1)]


def _duplicate_findings(pairs, paths, splits, labels, classes) -> list[dict]:
    """Cross-split pairs are leakage; `path` is the copy in the later split (the one to exclude).
    Byte-identical pairs are marked (`check` reports them too)."""
    order = {"train": 0, "val": 1, "test": 2}
    digests: dict[str, str] = {}

    def digest(path: str) -> str:  # the same hash `check` compares for exact duplicates
        if path not in digests:
            digests[path] = inspect_image(path, DEFAULT_MAX_PIXELS).sha1
        return digests[path]

    rows, ranks = [], {"leakage": 0, "near_duplicate": 0}
    for i, j, similarity in pairs:
        if order.get(splits[i], 0) > order.get(splits[j], 0):
            i, j = j, i
        kind = "leakage" if splits[i] != splits[j] else "near_duplicate"
        ranks[kind] += 1
        row = _row(kind, ranks[kind], paths[j], splits[j], classes[labels[j]], "", similarity)
        row.update(other_path=paths[i], other_split=splits[i], exact=digest(paths[i]) == digest(paths[j]))
        rows.append(row)
    return rows


def _outlier_findings(scores, cutoff, paths, splits, labels, classes) -> list[dict]:
    flagged = [i for i in np.argsort(-scores, kind="stable") if scores[i] > cutoff]
    return [_row("outlier", rank, paths[i], splits[i], classes[labels[i]], "", scores[i])
            for rank, i in enumerate(flagged, start=1)]


def _row(kind: str, rank: int, path: str, split: str, given: str, suggested: str, score: float) -> dict:
    return {"kind": kind, "rank": rank, "path": path, "split": split, "given_label": given,
            "suggested_label": suggested, "score": round(float(score), 6), "other_path": "", "other_split": "", "exact": ""}


def _groups(findings: list[dict]) -> list[dict]:
    """Findings per kind for the page, the first SHOWN_PER_KIND with thumbnails."""
    groups = []
    for kind in KINDS:
        rows = [f for f in findings if f["kind"] == kind]
        shown = [{**f, "thumb": _thumb(f["path"]), "other_thumb": _thumb(f["other_path"]) if f["other_path"] else ""}
                 for f in rows[:SHOWN_PER_KIND]]
        groups.append({"kind": kind, "total": len(rows), "rows": shown})
    return groups


def _thumb(path: str) -> str:
    """Decoded as training decodes (EXIF rotation, CMYK, 16-bit, alpha); "" when it cannot be."""
    try:
        image = load_rgb(path, DEFAULT_MAX_PIXELS, draft_size=THUMB)
    except ImageLoadError:
        return ""
    image.thumbnail((THUMB, THUMB))
    return data_uri(image)


def _json(record: dict) -> str:
    return json.dumps(record, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
