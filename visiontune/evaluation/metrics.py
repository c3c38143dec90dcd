"""Classification metrics from saved predictions: scikit-learn's definitions, nothing re-derived.

Everything here is a pure function of (true labels, probabilities) so that a test can recompute
each number independently from `predictions.csv`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

ECE_BINS = 15
BOOTSTRAP_SAMPLES = 1000


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str], y_pred: np.ndarray | None = None) -> dict:
    """Accuracy, F1 (macro / weighted / micro), per-class report, confusion matrix, confused pairs.

    `y_pred` defaults to the argmax; binary runs with a decision threshold pass their own.
    """
    index = np.arange(len(labels))
    y_pred = probs.argmax(axis=1) if y_pred is None else y_pred
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=index, zero_division=0
    )
    counts = confusion_matrix(y_true, y_pred, labels=index)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": _f1(y_true, y_pred, index, "macro"),
        "f1_weighted": _f1(y_true, y_pred, index, "weighted"),
        "f1_micro": _f1(y_true, y_pred, index, "micro"),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": {"labels": labels, "counts": counts.tolist(), "normalized": normalized.round(6).tolist()},
        "most_confused": most_confused(counts, labels),
    }


def prediction_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """What `evaluate` reports for one set of predictions: classification_metrics, 95% bootstrap
    intervals of accuracy and macro-F1, and the expected calibration error."""
    return {
        **classification_metrics(y_true, probs, labels),
        "bootstrap_95ci": bootstrap_intervals(y_true, probs.argmax(axis=1), len(labels)),
        "calibration": {"uncalibrated": expected_calibration_error(y_true, probs)},
    }


def most_confused(counts: np.ndarray, labels: list[str]) -> list[dict]:
    """Off-diagonal cells, largest first: which class is mistaken for which, and how often."""
    pairs = [
        {"actual": labels[i], "predicted": labels[j], "count": int(counts[i, j])}
        for i in range(len(labels))
        for j in range(len(labels))
        if i != j and counts[i, j] > 0
    ]
    return sorted(pairs, key=lambda p: (-p["count"], p["actual"], p["predicted"]))


def binary_curves(y_true: np.ndarray, positive_probs: np.ndarray, positive: int) -> dict:
    """ROC and precision-recall curves with their areas, for the class `positive`."""
    is_positive = (y_true == positive).astype(int)
    if is_positive.min() == is_positive.max():
        return {"roc_auc": None, "average_precision": None, "note": "only one class present"}
    fpr, tpr, _ = roc_curve(is_positive, positive_probs)
    precision, recall, _ = precision_recall_curve(is_positive, positive_probs)
    return {
        "roc_auc": float(roc_auc_score(is_positive, positive_probs)),
        "average_precision": float(average_precision_score(is_positive, positive_probs)),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "pr": {"precision": precision.tolist(), "recall": recall.tolist()},
    }


def threshold_for_recall(y_true: np.ndarray, positive_probs: np.ndarray, positive: int, target: float) -> dict:
    """The highest threshold whose recall of `positive` reaches `target` (so precision is best)."""
    is_positive = y_true == positive
    if not is_positive.any():
        raise ValueError("no positive examples to set a recall threshold on")
    scores = np.sort(positive_probs[is_positive])[::-1]
    needed = int(np.ceil(target * len(scores) - 1e-9))
    threshold = float(scores[max(needed, 1) - 1])
    return {"threshold": threshold, **precision_recall_at(y_true, positive_probs, positive, threshold)}


def precision_recall_at(y_true: np.ndarray, positive_probs: np.ndarray, positive: int, threshold: float) -> dict:
    predicted = positive_probs >= threshold
    actual = y_true == positive
    tp = int((predicted & actual).sum())
    return {
        "precision": tp / int(predicted.sum()) if predicted.any() else 0.0,
        "recall": tp / int(actual.sum()) if actual.any() else 0.0,
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """ECE over equal-width confidence bins, with the bins for a reliability diagram."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        acc, conf = float(correct[members].mean()), float(confidence[members].mean())
        ece += members.mean() * abs(acc - conf)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                      "accuracy": acc, "confidence": conf})
    return {"ece": float(ece), "bins": table}


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, seed: int = 0,
                        samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """95% percentile intervals of accuracy and macro-F1 over resampled test sets.

    All resamples at once through one batched confusion matrix: the same definitions as
    scikit-learn (F1 = 2tp / (2tp + fp + fn), macro over the classes a resample contains) without
    2,000 library calls.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(y_true), (samples, len(y_true)))
    cells = (y_true[picks] * n_classes + y_pred[picks]) + np.arange(samples)[:, None] * n_classes**2
    counts = np.bincount(cells.ravel(), minlength=samples * n_classes**2).reshape(samples, n_classes, n_classes)
    accuracies, f1s = resampled_scores(counts)
    return {
        "accuracy": [float(v) for v in np.percentile(accuracies, [2.5, 97.5])],
        "f1_macro": [float(v) for v in np.percentile(f1s, [2.5, 97.5])],
        "samples": samples,
    }


def resampled_scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of a stack of confusion matrices (samples, classes, classes)."""
    tp = np.diagonal(counts, axis1=1, axis2=2).astype(float)
    denominator = counts.sum(axis=1) + counts.sum(axis=2)  # (2tp + fp + fn) per class
    present = denominator > 0  # a class absent from a resample (true and predicted) is not scored 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / denominator, 0.0)
    return tp.sum(axis=1) / counts.sum(axis=(1, 2)), f1.sum(axis=1) / present.sum(axis=1)


def _f1(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, average: str) -> float:
    return float(f1_score(y_true, y_pred, labels=labels, average=average, zero_division=0))
