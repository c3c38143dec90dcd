"""The decision threshold on image scores, and F1 at a threshold.

Rules (an image is anomalous when its score >= the threshold, as in scikit-learn's curves):
- `good-quantile`: only good images (held out, or out-of-fold: anomaly/calibration.py): the
  (1 - false_alarm_rate) quantile of their scores (linear interpolation), so about that share of
  good images is flagged. With fewer than 1 / false_alarm_rate scores this is close to their
  maximum score.
- `f1-optimal`: when labelled defect images are given too: the threshold with the best F1 over
  the held-out good and the defect images.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve

GOOD_QUANTILE = "good-quantile"
F1_OPTIMAL = "f1-optimal"


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


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(f1_score(labels, scores >= threshold, zero_division=0.0))


def choose_threshold(good_scores: np.ndarray, defect_scores: np.ndarray | None,
                     false_alarm_rate: float) -> tuple[float, str]:
    """(threshold, rule name) by the rules above."""
    if defect_scores is None or len(defect_scores) == 0:
        return good_quantile_threshold(good_scores, false_alarm_rate), GOOD_QUANTILE
    scores = np.concatenate([good_scores, defect_scores])
    labels = np.concatenate([np.zeros(len(good_scores)), np.ones(len(defect_scores))])
    return best_f1_threshold(scores, labels)[0], F1_OPTIMAL
