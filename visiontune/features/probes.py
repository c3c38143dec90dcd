"""`visiontune probe`: scikit-learn classifiers on frozen features, evaluated like `evaluate`.

The split is the one `train` would use (same discovery, seed and fractions). Each classifier is a
Pipeline (standardise, then classify); its one hyperparameter is chosen on the validation split
only, so test numbers are honest and validation numbers say they are optimistic.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from visiontune.errors import UserError
from visiontune.evaluation import metrics as m
from visiontune.evaluation import plots
from visiontune.evaluation.evaluate import (
    HONESTY_NOTE,
    SELECTION_NOTE,
    write_predictions_csv,
)
from visiontune.features.extraction import SPLIT_DEFAULTS, extract
from visiontune.features.store import SUFFIXES, load_features
from visiontune.io import write_text_atomic
from visiontune.models.probe_heads import (
    CLASSIFIERS,
    class_probabilities,
    select_classifier,
)


def probe(data, *, classifier: str = "logreg", model: str | None = None, run: str | Path | None = None,
          out: str | Path | None = None, label_regex: str | None = SPLIT_DEFAULTS["label_regex"],
          val_fraction: float = SPLIT_DEFAULTS["val_fraction"], test_fraction: float = SPLIT_DEFAULTS["test_fraction"],
          seed: int = SPLIT_DEFAULTS["seed"], **extract_options) -> dict:
    """Fit `classifier` on frozen features of the train split of `data`, choose its hyperparameter on
    val, and write metrics.json, predictions.csv and a confusion matrix for val and test to `out`
    (default probes/<timestamp>-<model>-<classifier>).

    `data` is a data source (features are extracted with `model` or `run` and the other options of
    `extract`) or a feature file written by `extract` from one (its paths, labels and splits are used).
    """
    if classifier not in CLASSIFIERS:
        raise UserError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, not {classifier!r}")
    if extract_options.get("pool", "avg") == "none":
        raise UserError("probe needs pooled features (--pool avg or max)")
    if not isinstance(data, (str, Path)):
        raise UserError("probe needs a labelled data source (a class folder, split folders or a CSV file)")
    started = time.perf_counter()
    if Path(data).suffix.lower() in SUFFIXES and Path(data).is_file():
        if model is not None or run is not None:
            raise UserError(f"{data} already holds features; drop --model / --run")
        stored, extracted = load_features(data), {"skipped": [], "timings": None}
        if stored["meta"]["pool"] == "none" or -1 in stored["labels"]:
            raise UserError(f"{data} holds unpooled or unlabelled features; probe needs pooled, labelled ones")
        out_dir = _out_dir(out, stored["meta"]["model"], classifier)
    else:
        out_dir = _out_dir(out, model or Path(str(run)).name, classifier)
        try:
            with tempfile.TemporaryDirectory(prefix=".features.", dir=out_dir) as scratch:
                extracted = extract(data, out=Path(scratch) / "features.npz", model=model, run=run,
                                    label_regex=label_regex, val_fraction=val_fraction,
                                    test_fraction=test_fraction, seed=seed, **extract_options)
                stored = load_features(extracted["out"])
        except BaseException:
            out_dir.rmdir()  # nothing was written yet: leave no empty folder behind
            raise
    features_s = time.perf_counter() - started
    features, labels, classes = stored["features"], stored["labels"], stored["classes"]
    splits, paths = np.array(stored["splits"]), stored["paths"]
    parts = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not len(parts[name]):
            raise UserError(f"no readable images in the {name} split of {data}")
    pipeline, chosen, table = select_classifier(
        classifier, (features[parts["train"]], labels[parts["train"]]),
        (features[parts["val"]], labels[parts["val"]]), len(classes), seed)
    summary = {"classifier": classifier, "chosen": chosen, "chosen_on": "val", "candidates": table,
               "model": stored["meta"]["model"], "run": stored["meta"]["run"], "layers": stored["meta"]["layers"],
               "pool": stored["meta"]["pool"], "labels": classes, "dim": int(features.shape[1]),
               "counts": {name: len(rows) for name, rows in parts.items()}, "skipped": extracted["skipped"],
               "features_file": str(data) if extracted["timings"] is None else None, "out": str(out_dir)}
    for name in ("val", "test"):
        rows = parts[name]
        if len(rows):
            probs = class_probabilities(pipeline, features[rows], len(classes))
            result = _write_split(out_dir / name, name, [paths[i] for i in rows], labels[rows], probs, classes, summary)
            summary[name] = {key: result[key] for key in ("n", "accuracy", "f1_macro", "bootstrap_95ci")}
    summary["timings"] = {"features_s": round(features_s, 3), "extract": extracted["timings"],
                          "probe_s": round(time.perf_counter() - started - features_s, 3)}
    write_text_atomic(out_dir / "probe.json", json.dumps(summary, indent=2))
    return summary


def _write_split(out_dir: Path, name: str, paths: list[str], y_true: np.ndarray, probs: np.ndarray,
                 labels: list[str], summary: dict) -> dict:
    """The files `evaluate` writes for a split: metrics.json, predictions.csv, confusion_matrix.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    note = SELECTION_NOTE.format(split="validation", what="selected") if name == "val" else HONESTY_NOTE
    result = {"name": name, "split": name, "classifier": summary["classifier"], "chosen": summary["chosen"],
              "model": summary["model"], "run": summary["run"], "layers": summary["layers"], "labels": labels,
              "notes": [note], **m.prediction_metrics(y_true, probs, labels)}
    write_predictions_csv(out_dir / "predictions.csv", paths, y_true, probs, labels)
    plots.confusion_matrix_png(result["confusion_matrix"], out_dir / "confusion_matrix.png")
    result["figures"] = {"confusion_matrix": "confusion_matrix.png"}
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=2))
    return result


def _out_dir(out: str | Path | None, name: str, classifier: str) -> Path:
    if out is None:
        out = Path("probes") / f"{datetime.now():%Y%m%d-%H%M%S}-{name}-{classifier}"
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out
