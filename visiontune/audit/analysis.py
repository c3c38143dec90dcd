"""The audit's numerical core on pooled features: numpy, scikit-learn and cleanlab only.

Out-of-fold probabilities come from a standardised logistic regression per stratified fold, its
regularisation chosen by an inner cross-validation on that fold's training rows, so every image
is scored by a model that never saw its label; cleanlab ranks the label issues from them.
Near-duplicates and outliers use cosine geometry on L2-normalised features.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from cleanlab.count import estimate_joint
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visiontune.errors import UserError

log = logging.getLogger(__name__)
# Cosine similarity (of mean-centred features) from which two images are near-duplicates:
# calibrated on the hymenoptera benchmark with tf_efficientnet_lite0, where planted copies scored
# 0.833 and up and the most similar distinct pair 0.802 (docs/benchmarks.md, "Data audit").
DUPLICATE_SIMILARITY = 0.82
OUTLIER_NEIGHBOURS = 5
CS = np.logspace(-4, 2, 7)  # the inner CV's grid of inverse regularisation strengths
OUTLIER_MADS = 5.0  # robust cutoff: median + this many (scaled) median absolute deviations


@dataclass
class Folds:
    """Out-of-fold class probabilities [N, C] and the fold count actually used."""

    pred_probs: np.ndarray
    folds: int
    warnings: list[str]


@dataclass
class LabelIssues:
    """Images whose given label looks wrong, worst first, and per-class estimated noise rates."""

    indices: np.ndarray  # into the rows given, ranked by self-confidence (lowest first)
    suggested: np.ndarray  # class index per flagged image: the out-of-fold argmax
    quality: np.ndarray  # label quality score of every row, 0 (surely wrong) to 1
    noise_rates: np.ndarray  # per given class: estimated share of its labels that are wrong


def checked_folds(labels: np.ndarray, classes: list[str], folds: int) -> tuple[int, list[str]]:
    """The fold count every class can fill: lowered to the smallest class (with a warning naming
    it), refused below 3 images (the inner CV needs 2 in each fold's training rows); one class
    only is refused (label issues need two)."""
    counts = np.bincount(labels, minlength=len(classes))
    present = [i for i in range(len(classes)) if counts[i]]
    if len(present) < 2:
        raise UserError(f"label issues need at least 2 classes with readable images, found "
                        f"{[classes[i] for i in present]}")
    if folds < 2:
        raise UserError(f"--folds must be at least 2, not {folds}")
    smallest = min(present, key=lambda i: counts[i])
    if counts[smallest] < 3:
        raise UserError(f"class '{classes[smallest]}' has only {counts[smallest]} readable image(s); "
                        "out-of-fold predictions need at least 3 per class")
    if counts[smallest] >= folds:
        return folds, []
    message = (f"class '{classes[smallest]}' has only {counts[smallest]} images, fewer than {folds} folds: "
               f"using {counts[smallest]} folds")
    log.warning(message)
    return int(counts[smallest]), [message]


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, classes: list[str], folds: int = 5,
                              seed: int = 0) -> Folds:
    """Class probabilities of each row from a linear head fitted on the other folds. The head's C
    is chosen by log loss in an inner 3-fold CV: with C=1 the head fits the wrong labels and
    cleanlab flagged twice as many images as were flipped on the benchmark."""
    folds, notes = checked_folds(labels, classes, folds)
    probs = np.zeros((len(labels), len(classes)))
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        counts = np.bincount(labels[train])
        inner = int(min(3, counts[counts > 0].min()))  # at least 2: checked_folds keeps 3 images per class
        head = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=CS, cv=inner, scoring="neg_log_loss",
                                                                    max_iter=2000))
        with warnings.catch_warnings():  # scikit-learn's notices of future defaults; ours are explicit
            warnings.simplefilter("ignore", FutureWarning)
            head.fit(features[train], labels[train])
        probs[np.ix_(held_out, head.classes_)] = head.predict_proba(features[held_out])
    return Folds(probs, folds, notes)


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> LabelIssues:
    """cleanlab's confident-learning filter, ranked by self-confidence, with noise rates from its joint."""
    ranked = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")
    joint = estimate_joint(labels, pred_probs)  # [given, true]
    given = joint.sum(axis=1)
    noise = np.where(given > 0, 1 - np.diag(joint) / np.where(given > 0, given, 1), 0.0)
    return LabelIssues(np.asarray(ranked, dtype=np.int64), pred_probs[ranked].argmax(axis=1),
                       get_label_quality_scores(labels, pred_probs), noise)


def normalised(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def near_duplicate_pairs(features: np.ndarray, threshold: float = DUPLICATE_SIMILARITY) -> list[tuple[int, int, float]]:
    """(i, j, cosine similarity) with i < j for every pair at or above `threshold`, most similar first.
    Features are centred on their mean first: pooled activations share a large common component
    that makes distinct images look alike (on the benchmark it halved the gap to planted copies)."""
    features = features.astype(np.float64)
    unit = normalised(features - features.mean(axis=0))
    similarity = unit @ unit.T
    i, j = np.nonzero(np.triu(similarity >= threshold, k=1))
    order = np.argsort(-similarity[i, j], kind="stable")
    return [(int(i[k]), int(j[k]), float(similarity[i[k], j[k]])) for k in order]


def outlier_scores(features: np.ndarray, neighbours: int = OUTLIER_NEIGHBOURS,
                   mads: float = OUTLIER_MADS) -> tuple[np.ndarray, float]:
    """Mean cosine distance to the k nearest other rows, and the robust cutoff above which a row is an outlier."""
    k = min(neighbours, len(features) - 1)
    if k < 1:
        return np.zeros(len(features)), float("inf")
    distances, _ = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(features).kneighbors(features)
    scores = distances[:, 1:].mean(axis=1)  # column 0 is the row itself
    median = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - median)))
    return scores, median + mads * max(spread, 1e-12)
