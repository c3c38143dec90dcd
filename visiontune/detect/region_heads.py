"""The linear models R-CNN fits on frozen region features: a per-class SVM with hard-negative
mining, Platt scaling of its scores, and class-specific box regression.

All of them end as plain weight arrays (saved as safetensors by `rcnn`), so nothing fitted here
is ever pickled. Features come in standardised (`standardiser`), which keeps LinearSVC's solver
and Ridge's penalty independent of the backbone's feature scale.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.svm import LinearSVC

HARD_MARGIN = -1.0  # negatives scoring above this are hard (inside the margin or misclassified)
EASY_MARGIN = -1.05  # cached negatives scoring below this are dropped between rounds (R-CNN's values)
DELTA_CLIP = float(np.log(1000.0 / 16))  # the largest log-scale change applied, as torchvision clips it


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the feature columns; constant columns get scale 1."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


def encode_boxes(proposals: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """R-CNN's regression targets: (dx, dy, dw, dh) of each target box relative to its proposal."""
    pw, ph, px, py = _centres(proposals)
    gw, gh, gx, gy = _centres(targets)
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1).astype(np.float32)


def decode_boxes(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The inverse of `encode_boxes`: proposals moved and scaled by deltas, xyxy."""
    pw, ph, px, py = _centres(proposals)
    deltas = np.asarray(deltas, dtype=np.float32).reshape(-1, 4)
    cx, cy = px + deltas[:, 0] * pw, py + deltas[:, 1] * ph
    w = pw * np.exp(np.minimum(deltas[:, 2], DELTA_CLIP))
    h = ph * np.exp(np.minimum(deltas[:, 3], DELTA_CLIP))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


def _centres(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
    return w, h, boxes[:, 0] + w / 2, boxes[:, 1] + h / 2


def fit_box_regressor(features: np.ndarray, proposals: np.ndarray, targets: np.ndarray,
                      alpha: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge from features to the (dx, dy, dw, dh) that take each proposal to its true box:
    (weight [4, D], bias [4])."""
    ridge = Ridge(alpha=alpha).fit(features, encode_boxes(proposals, targets))
    return ridge.coef_.astype(np.float32), ridge.intercept_.astype(np.float32)


def fit_svm(positives: np.ndarray, negatives: np.ndarray, c: float, rounds: int = 2, max_negatives: int = 4000,
            seed: int = 0) -> tuple[np.ndarray, float]:
    """A linear SVM of positives against negatives, with R-CNN's hard-negative mining: start from
    a random half of the negative budget; each round scores every negative, drops the easy ones
    from the working set and adds the hardest new ones (at most `max_negatives` in all).
    Returns (weight [D], bias)."""
    rng = np.random.default_rng(seed)
    working = np.sort(rng.permutation(len(negatives))[: max(1, max_negatives // 2)])
    for round_ in range(rounds + 1):
        weight, bias = _linear_svc(positives, negatives[working], c, seed)
        if round_ == rounds:
            break
        scores = negatives @ weight + bias
        kept = working[scores[working] >= EASY_MARGIN]
        hard = np.setdiff1d(np.flatnonzero(scores > HARD_MARGIN), kept)
        if len(hard) == 0:
            break
        candidates = np.concatenate([kept, hard])
        working = np.sort(candidates[np.argsort(-scores[candidates], kind="stable")][:max_negatives])
    return weight, bias


def _linear_svc(positives: np.ndarray, negatives: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    x = np.concatenate([positives, negatives])
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    with warnings.catch_warnings():  # a few unconverged iterations on separable features are harmless here
        warnings.simplefilter("ignore", ConvergenceWarning)
        svc = LinearSVC(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(x, y)
    return svc.coef_[0].astype(np.float32), float(svc.intercept_[0])


def fit_platt(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(a, b) so that sigmoid(a * score + b) is the probability that a region is positive; (1, 0)
    when the scores have only one kind of region to fit on."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return 1.0, 0.0
    model = LogisticRegression(C=1e4).fit(np.asarray(scores).reshape(-1, 1), positive, sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)
