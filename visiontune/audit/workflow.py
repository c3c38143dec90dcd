"""`visiontune audit`: one frozen-backbone pass over a data source, then label issues,
near-duplicates (cross-split ones as leakage) and outliers, written to OUT/findings.csv,
OUT/findings.json and OUT/report.html. Only OUT is written; the user's images are only read.
`near_duplicates` is the same duplicate search for `check --near-duplicates`."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from visiontune.audit import analysis as a
from visiontune.audit.features import FeatureRows, frozen_features, stored_features
from visiontune.audit.finetune import fine_tuned_probabilities, fold_recipe
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, inspect_image, load_rgb
from visiontune.errors import UserError
from visiontune.features.extraction import SPLIT_DEFAULTS
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.reporting.html import render_page
from visiontune.reporting.images import data_uri

FIELDS = ["kind", "rank", "path", "split", "given_label", "suggested_label", "score", "other_path", "other_split", "exact"]
KINDS = ("label_issue", "leakage", "near_duplicate", "outlier")
SHOWN_PER_KIND = 50  # thumbnails in the page; the CSV and JSON hold every finding
THUMB = 112


def audit(data, *, out: str | Path | None = None, model: str | None = None, run: str | Path | None = None,
          weights: str | Path | None = None, pretrained: bool = True, folds: int = 5, fine_tune: bool = False,
          epochs: int | None = None, duplicate_similarity: float | None = None, image_size: int | None = None,
          label_regex: str | None = SPLIT_DEFAULTS["label_regex"],
          val_fraction: float = SPLIT_DEFAULTS["val_fraction"], test_fraction: float = SPLIT_DEFAULTS["test_fraction"],
          seed: int = SPLIT_DEFAULTS["seed"], batch_size: int = 32, workers: int | None = None,
          threads: int | None = None, device: str = "auto", progress: bool = False) -> dict:
    """Audit the labelled images of `data` (split as `train` splits it) and write OUT; returns findings.json's record.

    Out-of-fold probabilities come from a linear head per fold on the frozen features, or with
    `fine_tune` from the training recipe (`run`'s, or the defaults for `model`; `epochs` overrides
    it) fine-tuned once per fold. Near-duplicates and outliers use the frozen features either way.
    """
    started = time.perf_counter()
    duplicate_similarity = a.DUPLICATE_SIMILARITY if duplicate_similarity is None else duplicate_similarity
    if not isinstance(data, (str, Path)):
        raise UserError("audit needs a labelled data source: an image folder, split folder or CSV file")
    if epochs is not None and not fine_tune:
        raise UserError("--epochs applies to --fine-tune (the linear head of each fold has no epochs)")
    out_dir = Path(out).expanduser() if out else Path("audits") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir} already exists and is not an empty folder; choose another one")
    root = Path(data).expanduser().resolve()
    if root.is_dir() and out_dir.resolve().is_relative_to(root):
        raise UserError(f"--out {out_dir} is inside the data folder {root}; the audit writes nothing there")
    rows = frozen_features(data, model=model, run=run, weights=weights, pretrained=pretrained,
                           image_size=image_size, label_regex=label_regex, val_fraction=val_fraction,
                           test_fraction=test_fraction, seed=seed, batch_size=batch_size, workers=workers,
                           threads=threads, device=device)
    features_s = time.perf_counter() - started
    paths, splits, labels, classes = rows.paths, rows.splits, rows.labels, rows.classes

    fold_runs: list[dict] = []
    if fine_tune:
        recipe = fold_recipe(run, model, {"weights": weights, "pretrained": pretrained if run is None else None,
                                          "image_size": image_size, "epochs": epochs, "batch_size": batch_size,
                                          "workers": workers, "threads": threads, "device": device})
        out_dir.mkdir(parents=True, exist_ok=True)
        fold_result, fold_runs = fine_tuned_probabilities(paths, labels, classes, recipe, out_dir, folds, seed,
                                                          progress=progress)
    else:
        fold_result = a.out_of_fold_probabilities(rows.features, labels, classes, folds, seed)
    issues = a.label_issues(labels, fold_result.pred_probs)
    findings = _label_findings(issues, labels, classes, paths, splits)
    findings += duplicate_findings(rows, duplicate_similarity)
    scores, cutoff = a.outlier_scores(rows.features)
    findings += _outlier_findings(scores, cutoff, paths, splits, labels, classes)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out_dir / "findings.csv", FIELDS, findings)
    counts = {kind: sum(f["kind"] == kind for f in findings) for kind in KINDS}
    record = {
        "data": str(data), "model": rows.backbone, "run": str(run) if run is not None else None,
        "images": len(paths), "classes": classes, "folds": fold_result.folds, "warnings": fold_result.warnings,
        "out_of_fold": "fine-tune" if fine_tune else "linear head on frozen features", "fold_runs": fold_runs,
        "oof_accuracy": float((fold_result.pred_probs.argmax(axis=1) == labels).mean()),
        "noise_rates": {name: float(rate) for name, rate in zip(classes, issues.noise_rates)},
        "settings": {"duplicate_similarity": duplicate_similarity, "outlier_neighbours": a.OUTLIER_NEIGHBOURS,
                     "outlier_cutoff": cutoff, "seed": seed},
        "counts": counts, "skipped": rows.skipped, "findings": findings,
        "timings": {"features_s": round(features_s, 3), "total_s": round(time.perf_counter() - started, 3)},
    }
    write_text_atomic(out_dir / "findings.json", _json(record))
    render_page("audit.html", out_dir / "report.html", title="Data audit", record=record,
                groups=_groups(findings), shown=SHOWN_PER_KIND)
    record["out"] = str(out_dir)
    return record


def near_duplicates(data=None, *, features: str | Path | None = None, model: str | None = None,
                    run: str | Path | None = None, duplicate_similarity: float | None = None, **backbone) -> dict:
    """`check --near-duplicates`: the audit's near-duplicate findings alone, from the pooled
    features of a `visiontune features` file, or from one frozen pass of `data` through `model`
    or `run` (with `backbone`'s weights / image size / split options, as `frozen_features` takes them)."""
    if features is None and model is None and run is None:
        raise UserError("--near-duplicates needs features: --model NAME (with --weights FILE offline), "
                        "--run RUN, or --features FILE from `visiontune features`")
    if features is not None and (model is not None or run is not None):
        raise UserError("--features brings its own features; leave out --model and --run")
    threshold = a.DUPLICATE_SIMILARITY if duplicate_similarity is None else duplicate_similarity
    rows = (stored_features(features) if features is not None
            else frozen_features(data, model=model, run=run, **backbone))
    found = duplicate_findings(rows, threshold)
    return {"model": rows.backbone, "images": len(rows.paths), "similarity": threshold, "skipped": rows.skipped,
            "leakage": [f for f in found if f["kind"] == "leakage"],
            "near_duplicate": [f for f in found if f["kind"] == "near_duplicate"]}


def _label_findings(issues: a.LabelIssues, labels, classes, paths, splits) -> list[dict]:
    return [_row("label_issue", rank, paths[i], splits[i], classes[labels[i]], classes[suggested],
                 issues.quality[i])
            for rank, (i, suggested) in enumerate(zip(issues.indices, issues.suggested), start=1)]


def duplicate_findings(rows: FeatureRows, threshold: float) -> list[dict]:
    """Near-duplicate pairs of `rows`: cross-split pairs are leakage, `path` being the copy in the
    later split (the one to exclude). Byte-identical pairs are marked (`check` reports them too)."""
    paths, splits, labels, classes = rows.paths, rows.splits, rows.labels, rows.classes
    order = {"train": 0, "val": 1, "test": 2}
    digests: dict[str, str] = {}

    def digest(path: str) -> str:  # the same hash `check` compares for exact duplicates
        if path not in digests:
            digests[path] = inspect_image(path, DEFAULT_MAX_PIXELS).sha1
        return digests[path]

    found, ranks = [], {"leakage": 0, "near_duplicate": 0}
    for i, j, similarity in a.near_duplicate_pairs(rows.features, threshold):
        if order.get(splits[i], 0) > order.get(splits[j], 0):
            i, j = j, i
        kind = "leakage" if splits[i] != splits[j] else "near_duplicate"
        ranks[kind] += 1
        row = _row(kind, ranks[kind], paths[j], splits[j], classes[labels[j]], "", similarity)
        row.update(other_path=paths[i], other_split=splits[i], exact=digest(paths[i]) == digest(paths[j]))
        found.append(row)
    return found


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
