"""Metric helpers against scikit-learn and hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from visiontune.evaluation import metrics as m


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_vectorised_resample_scores_equal_scikit_learn(n_classes):
    rng = np.random.default_rng(n_classes)
    stacks, expected = [], []
    for _ in range(20):
        y_true = rng.integers(0, n_classes, 40)
        y_pred = np.where(rng.random(40) < 0.6, y_true, rng.integers(0, n_classes, 40))
        stacks.append(confusion_matrix(y_true, y_pred, labels=range(n_classes)))
        expected.append((accuracy_score(y_true, y_pred),
                         f1_score(y_true, y_pred, average="macro", zero_division=0)))  # classes present
    accuracy, f1 = m.resampled_scores(np.stack(stacks))
    np.testing.assert_allclose(accuracy, [e[0] for e in expected])
    np.testing.assert_allclose(f1, [e[1] for e in expected])


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 60)
    y_pred = np.where(rng.random(60) < 0.7, y_true, (y_true + 1) % 3)
    first = m.bootstrap_intervals(y_true, y_pred, 3)
    assert first == m.bootstrap_intervals(y_true, y_pred, 3)
    low, high = first["accuracy"]
    assert low < accuracy_score(y_true, y_pred) < high and high - low < 0.35


def test_perfect_predictions_have_a_degenerate_interval_even_when_a_class_is_rare():
    y_true = np.array([0] * 30 + [1] * 30 + [2] * 2)
    intervals = m.bootstrap_intervals(y_true, y_true.copy(), 3)
    assert intervals["accuracy"] == [1.0, 1.0] and intervals["f1_macro"] == [1.0, 1.0]


def test_threshold_for_recall_reaches_the_target_with_the_highest_threshold():
    y_true = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    p_pos = np.array([.95, .9, .85, .8, .7, .6, .5, .4, .3, .2, .65, .35, .1, .05])
    chosen = m.threshold_for_recall(y_true, p_pos, positive=1, target=0.9)
    assert chosen["threshold"] == 0.3 and chosen["recall"] == 0.9
    assert chosen["precision"] == pytest.approx(9 / 11)
    assert m.threshold_for_recall(y_true, p_pos, 1, 1.0)["threshold"] == 0.2


def test_expected_calibration_error_of_a_perfectly_calibrated_and_an_overconfident_model():
    y_true = np.array([0, 0, 0, 0, 1])
    probs = np.tile([0.8, 0.2], (5, 1))  # 80% confident, 80% right
    assert m.expected_calibration_error(y_true, probs)["ece"] == pytest.approx(0.0)
    overconfident = np.tile([0.99, 0.01], (5, 1))
    assert m.expected_calibration_error(y_true, overconfident)["ece"] == pytest.approx(0.19)


def test_most_confused_pairs_are_sorted_by_count():
    counts = np.array([[5, 3, 0], [1, 4, 0], [0, 6, 2]])
    pairs = m.most_confused(counts, ["a", "b", "c"])
    assert [(p["actual"], p["predicted"], p["count"]) for p in pairs] == [("c", "b", 6), ("a", "b", 3), ("b", "a", 1)]
