"""The audit's core on synthetic features: planted label flips and near-duplicates are found and ranked first."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.audit import analysis as a
from visiontune.errors import UserError


def clusters(per_class: int = 40, classes: int = 3, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters, one per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(0, 1, (len(labels), dim)), labels


def test_planted_label_flips_are_found_and_ranked_first():
    features, labels = clusters(per_class=20)
    flipped = np.array([3, 25, 47, 51])
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + 1) % 3
    folds = a.out_of_fold_probabilities(features, noisy, ["a", "b", "c"], folds=4, seed=0)
    issues = a.label_issues(noisy, folds.pred_probs)
    assert set(issues.indices[:4]) == set(flipped)
    assert len(issues.indices) <= 6  # clean clusters: at most a couple of false flags
    assert list(issues.suggested[:4]) == list(labels[issues.indices[:4]])  # the true class is suggested
    assert issues.quality[flipped].max() < np.delete(issues.quality, flipped).min()
    assert issues.noise_rates.shape == (3,) and issues.noise_rates.max() < 0.15


def test_out_of_fold_probabilities_never_see_their_own_label():
    # random labels on pure noise: an in-sample fit would score far above chance, out of fold cannot
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(40, 40)), np.repeat([0, 1], 20)
    probs = a.out_of_fold_probabilities(features, labels, ["x", "y"], folds=3).pred_probs
    assert np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == labels).mean() < 0.75


def test_small_class_lowers_the_fold_count_and_names_the_class():
    features, labels = clusters(per_class=10, classes=2)
    keep = np.r_[np.arange(10), 10, 11, 12]  # class "rare" keeps 3 images
    result = a.out_of_fold_probabilities(features[keep], labels[keep], ["common", "rare"], folds=5)
    assert result.folds == 3
    assert "class 'rare' has only 3 images" in result.warnings[0]


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 0, 0, 1, 1]), "class 'b' has only 2 readable image"),
    (np.array([0, 0, 0, 0]), "at least 2 classes"),
])
def test_too_few_images_or_one_class_is_refused(labels, message):
    with pytest.raises(UserError, match=message):
        a.checked_folds(labels, ["a", "b"], 5)


def test_near_duplicates_are_paired_most_similar_first_and_distinct_images_are_not():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(30, 64))
    features[20] = features[3] + rng.normal(0, 0.05, 64)  # a close copy
    features[25] = features[7] * 1.7 + rng.normal(0, 0.2, 64)  # a rescaled, noisier copy
    pairs = a.near_duplicate_pairs(features, threshold=0.9)
    assert [(i, j) for i, j, _ in pairs] == [(3, 20), (7, 25)]
    assert pairs[0][2] > pairs[1][2] > 0.9


def test_an_image_far_from_all_others_is_the_only_outlier():
    features, _ = clusters(per_class=30, classes=2, seed=3)
    features = np.vstack([features, np.full(16, 40.0) * np.r_[1, -1] .repeat(8)])
    scores, cutoff = a.outlier_scores(features)
    assert np.flatnonzero(scores > cutoff).tolist() == [60]
