"""`visiontune detect fit`: images + boxes in, a detector run directory out.

Annotations are parsed (their problems listed in summary.json, never fatal) and split by image;
the chosen method trains on train and keeps its best epoch by validation; the score threshold is
then chosen on validation only (the highest one reaching the target recall); and the test split is
scored once, at the end, into RUN/eval/test/.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from visiontune._version import __version__
from visiontune.detect.annotations import load_annotations, split_detection_set
from visiontune.detect.evaluation import match_all, recall_precision_at, threshold_for_recall
from visiontune.detect.methods import OPTIONS_KEY, check_method, fit_method
from visiontune.detect.run import SPLITS_FIELDS, DetectorRun, detect_files
from visiontune.detect.types import ImageTargets
from visiontune.errors import UserError
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.locking import is_only_lock, locked_dir
from visiontune.runformat import META_FILE, SPLITS_FILE, SUMMARY_FILE, meta_fields

log = logging.getLogger(__name__)


def fit(annotations: str | Path, images: str | Path, out: str | Path | None = None, method: str = "faster-rcnn",
        fmt: str = "auto", *, target_recall: float = 0.9, seed: int = 0, val_fraction: float = 0.2,
        test_fraction: float = 0.2, min_area: float = 1.0, classes: list[str] | None = None,
        faster_rcnn: BaseModel | None = None, rcnn: BaseModel | None = None, report: bool = True) -> DetectorRun:
    """Fit a detector of `method` on `annotations` for `images` (see the module docstring); the
    method's options are `faster_rcnn` (FasterRCNNOptions) or `rcnn` (RCNNOptions)."""
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], not {target_recall}")
    options = check_method(method, faster_rcnn if method == "faster-rcnn" else rcnn)
    run_dir = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-detect-{method}").expanduser()
    if run_dir.exists() and not is_only_lock(run_dir):
        raise UserError(f"{run_dir} already exists and is not empty; pass another --out")
    dataset = load_annotations(annotations, images, fmt, min_area=min_area, classes=classes)
    splits = split_detection_set(dataset, val_fraction, test_fraction, seed)
    if not any(len(t.boxes) for t in splits["train"]) or not splits["val"]:
        raise UserError(f"{len(dataset.images)} usable images are too few: training needs boxes in train and at "
                        f"least one validation image (train {len(splits['train'])}, val {len(splits['val'])})")
    for problem in dataset.problems[:10]:
        log.warning("annotation %s: %s", problem.source, problem.reason)
    with locked_dir(run_dir):
        started = time.perf_counter()
        _write_splits(run_dir / SPLITS_FILE, splits, dataset.classes)
        detector = fit_method(method, splits["train"], splits["val"], dataset.classes, run_dir, options)
        fit_seconds = time.perf_counter() - started
        kept, found, _, _ = detect_files(detector, [t.path for t in splits["val"]])
        val = [splits["val"][i] for i in kept]
        threshold = threshold_for_recall(found, val, target_recall)
        val_recall, val_precision = recall_precision_at(match_all(found, val, len(dataset.classes)), threshold)
        meta = meta_fields("detector", __version__) | {
            "method": method, "classes": dataset.classes, "threshold": threshold, "target_recall": target_recall,
            OPTIONS_KEY[method]: options.model_dump(mode="json"),
        }
        write_text_atomic(run_dir / META_FILE, json.dumps(meta, indent=2))
        summary = {
            "method": method, "classes": dataset.classes, "fit_seconds": fit_seconds,
            "images": {split: len(targets) for split, targets in splits.items()},
            "boxes": {split: int(sum(len(t.boxes) for t in targets)) for split, targets in splits.items()},
            "threshold": {"value": threshold, "target_recall": target_recall, "val_recall": val_recall,
                          "val_precision": val_precision, "reached": val_recall >= target_recall - 1e-12},
            "annotation_problems": [{"source": p.source, "reason": p.reason} for p in dataset.problems],
        }
        run = DetectorRun(run_dir)
        if splits["test"]:
            test = run.evaluate("test", report=report)
            summary["test"] = {k: v for k, v in test["metrics"].items() if k != "pr_curves"} | {
                "images_per_second": test["images_per_second"]}
        write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return run


def _write_splits(path: Path, splits: dict[str, list[ImageTargets]], classes: list[str]) -> None:
    """One row per true box (an image without boxes: one row with no label), so the file alone
    gives back every split's targets."""
    rows = []
    for split, targets in splits.items():
        for t in targets:
            head = [str(Path(t.path).resolve()), split, t.width, t.height]
            rows += [head + [classes[int(label)], *np.round(box, 2).tolist()] for box, label in zip(t.boxes, t.labels)]
            if not len(t.boxes):
                rows.append(head + ["", "", "", "", ""])
    write_csv_atomic(path, SPLITS_FIELDS, rows)
