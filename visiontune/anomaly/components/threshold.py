"""The decision threshold on image scores, and F1 at a threshold.

Rules (an image is anomalous when its score >= the threshold, as in scikit-learn's curves):
- `good-quantile`: only good images (held out, or out-of-fold: anomaly/calibration.py): the
  (1 - false_alarm_rate) quantile of their scores (linear interpolation), so about that share of
  good images is flagged. With fewer than 1 / false_alarm_rate scores this is close to their
  maximum score.
- `f1-optimal`: when labelled validation defect images are given too: the threshold with the best
  F1 over the held-out good and the defect images.
- `target-recall`: validation defect images and a target recall R: the highest threshold that
  flags at least R of them, so that as few good images as possible are flagged at that recall (a
  factory that must catch R of its defects). With n defect images this is the ceil(R * n)-th
  highest defect score; the next higher defect score would flag fewer than R.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve

from visiontune.evaluation.metrics import threshold_for_recall

GOOD_QUANTILE = "good-quantile"
F1_OPTIMAL = "f1-optimal"
TARGET_RECALL = "target-recall"


def good_quantile_threshold(good_scores: np.ndarray, false_alarm_rate: float) -> float:
    if not 0 <= false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    return float(np.quantile(good_scores, 1.0 - false_alarm_rate))


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over all thresholds; labels 1 = anomalous."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def target_recall_threshold(defect_scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold flagging at least `target_recall` of the defect images (the same rule
    as a classifier's recall threshold, evaluation/metrics.py)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    return threshold_for_recall(np.ones(len(defect_scores), int), defect_scores, 1, target_recall)["threshold"]


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(f1_score(labels, scores >= threshold, zero_division=0.0))


def flagged_share(scores: np.ndarray, threshold: float) -> float:
    """The share of `scores` at or above `threshold`: recall of defect images, false-alarm rate of good ones."""
    return float((scores >= threshold).mean())


def choose_threshold(good_scores: np.ndarray, defect_scores: np.ndarray | None, false_alarm_rate: float,
                     target_recall: float | None = None) -> tuple[float, str]:
    """(threshold, rule name) by the rules above; `target_recall` needs defect scores."""
    if defect_scores is None or len(defect_scores) == 0:
        if target_recall is not None:
            raise ValueError("a target recall needs defect scores to measure it on")
        return good_quantile_threshold(good_scores, false_alarm_rate), GOOD_QUANTILE
    if target_recall is not None:
        return target_recall_threshold(defect_scores, target_recall), TARGET_RECALL
    scores = np.concatenate([good_scores, defect_scores])
    labels = np.concatenate([np.zeros(len(good_scores)), np.ones(len(defect_scores))])
    return best_f1_threshold(scores, labels)[0], F1_OPTIMAL
