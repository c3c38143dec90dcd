"""The shift numbers against hand computations on small synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.shift import analysis as a

U = a.UNLABELLED


def test_auroc_per_scorer_counts_target_above_source_pairs():
    source = {"energy": np.array([0.1, 0.4, 0.35]), "knn": np.array([1.0, 2.0, 3.0])}
    target = {"energy": np.array([0.8, 0.3]), "knn": np.array([2.5, 0.5])}
    auroc = a.domain_auroc(source, target)
    # energy: 0.8 beats all 3, 0.3 beats 1 of 3 -> 4/6; knn: 2.5 beats 2, 0.5 beats 0 -> 2/6
    assert auroc == pytest.approx({"energy": 4 / 6, "knn": 2 / 6})


def test_accuracy_leaves_unlabelled_images_out_and_has_a_ci():
    block = a.accuracy(np.array([0, 1, U, 1, U]), np.array([0, 0, 1, 1, 1]), 2)
    assert block["accuracy"] == pytest.approx(2 / 3) and block["images"] == 3
    low, high = block["ci95"]
    assert 0 <= low <= block["accuracy"] <= high <= 1
    assert a.accuracy(np.array([U, U]), np.array([0, 1]), 2) is None


def test_per_class_numbers_by_hand():
    labels = ["cat", "dog"]
    source_true, source_pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])
    source_features = np.array([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])
    target_true, target_pred = np.array([0, 1, U]), np.array([1, 1, 0])
    target_features = np.array([[0, 1.0], [1.0, 1.0], [5.0, 0]])
    scores = {"energy": np.array([1.0, 3.0, 7.0])}
    cat, dog = a.per_class(labels, source_true, source_pred, source_features, target_true, target_pred,
                           target_features, scores)
    assert cat["source_accuracy"] == 1.0 and cat["target_accuracy"] == 0.0
    assert dog["source_accuracy"] == 0.5 and dog["target_accuracy"] == 1.0
    assert (cat["source_share"], cat["target_share"]) == pytest.approx((3 / 4, 1 / 3))
    assert (dog["source_share"], dog["target_share"]) == pytest.approx((1 / 4, 2 / 3))
    assert cat["mean_scores"] == {"energy": 7.0} and dog["mean_scores"] == {"energy": 2.0}
    # cat: source centroid (1, 0); target = image 0 (true cat, (0, 1)) + image 2 (unlabelled, predicted cat, (1, 0))
    # -> centroid (0.5, 0.5): cosine 1/sqrt(2)
    assert cat["centroid_distance"] == pytest.approx(1 - 1 / np.sqrt(2))
    # dog: source centroid (0, 1); target image 1 normalised (1, 1)/sqrt(2): the same cosine
    assert dog["centroid_distance"] == pytest.approx(1 - 1 / np.sqrt(2))
    assert (cat["source_images"], cat["target_images"], cat["target_predicted"]) == (2, 1, 1)


def test_a_class_missing_from_a_domain_has_no_accuracy_distance_or_scores():
    (only,) = a.per_class(["a"], np.array([0]), np.array([0]), np.ones((1, 2)), np.array([U]), np.array([0]),
                          np.ones((1, 2)), {"knn": np.array([1.0])})
    assert only["target_accuracy"] is None and only["centroid_distance"] == pytest.approx(0.0)
    rows = a.per_class(["a", "b"], np.array([0]), np.array([0]), np.ones((1, 2)), np.array([0]), np.array([0]),
                       np.ones((1, 2)), {"knn": np.array([1.0])})
    assert rows[1]["source_accuracy"] is None and rows[1]["centroid_distance"] is None
    assert rows[1]["mean_scores"] == {"knn": None}


def test_embedding_is_two_dimensional_and_deterministic():
    rng = np.random.default_rng(0)
    features = np.r_[rng.normal(0, 1, (25, 16)), rng.normal(3, 1, (20, 16))]
    first, second = a.embed(features, seed=0), a.embed(features, seed=0)
    assert first.shape == (45, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    assert a.embed(features[:2]).shape == (2, 2)  # the smallest comparison: one image per domain


def test_subsample_is_seeded_sorted_and_capped():
    picked = a.subsample(5000, 1000, seed=3)
    assert len(picked) == 1000 and len(set(picked)) == 1000 and (np.diff(picked) > 0).all()
    np.testing.assert_array_equal(picked, a.subsample(5000, 1000, seed=3))
    np.testing.assert_array_equal(a.subsample(7, 1000), np.arange(7))


def test_most_ood_and_nearest_in_cosine_space():
    np.testing.assert_array_equal(a.most_ood(np.array([0.2, 0.9, 0.5, 0.9]), 3), [1, 3, 2])
    bank = np.array([[1.0, 0], [0, 10.0], [1.0, 1.0]])
    index, similarity = a.nearest(np.array([[0, 0.1], [3.0, 2.9]]), bank)
    np.testing.assert_array_equal(index, [1, 2])
    assert similarity[0] == pytest.approx(1.0) and similarity[1] == pytest.approx(5.9 / np.sqrt(2 * 17.41))


def _row(name, source_share, target_share, distance):
    return {"class": name, "source_share": source_share, "target_share": target_share, "centroid_distance": distance}


def test_reading_names_the_distance_the_accuracy_drop_and_the_class_that_moved_most():
    classes = [_row("cat", 0.5, 0.5, 0.1), _row("dog", 0.5, 0.5, 0.4)]
    text = a.reading({"knn": 0.98, "energy": 0.7}, "knn", {"accuracy": 0.95, "ci95": [0.9, 1.0]},
                     {"accuracy": 0.5, "ci95": [0.4, 0.6]}, classes)
    assert "far from the source (knn AUROC 0.98)" in text
    assert "drops from 0.95" in text and "to 0.50" in text and "Class dog moved most" in text
    overlapping = a.reading({"energy": 0.55}, "energy", {"accuracy": 0.9, "ci95": [0.8, 1.0]},
                            {"accuracy": 0.85, "ci95": [0.7, 0.95]}, classes)
    assert "looks like the source" in overlapping and "within their 95% intervals" in overlapping


def test_reading_of_an_unlabelled_target_names_the_prediction_that_changed_most():
    classes = [_row("cat", 0.5, 0.9, None), _row("dog", 0.5, 0.1, None)]
    text = a.reading({"energy": 0.75}, "energy", {"accuracy": 0.9, "ci95": [0.8, 1.0]}, None, classes)
    assert "clearly shifted" in text and "accuracy is unknown" in text and "cat changes most (50%" in text
    assert "moved most" not in text
