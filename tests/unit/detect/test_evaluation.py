"""Detection scoring: a perfect detector scores 1, an empty one 0, the threshold choice reaches the
asked recall, and the cheap AP@0.5 of the bootstrap agrees with torchmetrics'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visiontune.detect.evaluation import (
    average_precision_50,
    coco_map,
    detection_metrics,
    match_all,
    threshold_for_recall,
)
from visiontune.detect.types import Detections, ImageTargets

CLASSES = ["crack", "blob"]


def _targets(n: int = 5, seed: int = 0) -> list[ImageTargets]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        corners = rng.uniform(0, 40, (3, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(5, 20, (3, 2))], axis=1)
        out.append(ImageTargets(Path(f"{i}.png"), 64, 64, boxes, rng.integers(0, 2, 3)))
    return out


def test_a_perfect_detector_scores_one_and_an_empty_one_zero() -> None:
    targets = _targets()
    perfect = [Detections(t.boxes, np.ones(len(t.boxes)), t.labels) for t in targets]
    assert threshold_for_recall(perfect, targets, 0.9) == 1.0
    metrics, _ = detection_metrics(perfect, targets, CLASSES, threshold=1.0)
    assert metrics["map_50"]["value"] == pytest.approx(1.0) and metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"]["ci95"] == pytest.approx([1.0, 1.0])
    assert metrics["recall_at_threshold"] == 1.0 and metrics["precision_at_threshold"] == 1.0
    assert all(row["ap_50"] == pytest.approx(1.0) for row in metrics["per_class"].values())

    empty = [Detections.empty() for _ in targets]
    metrics, _ = detection_metrics(empty, targets, CLASSES, threshold=threshold_for_recall(empty, targets, 0.9))
    assert metrics["map_50"]["value"] == 0.0 and metrics["map"] == 0.0
    assert metrics["recall_at_threshold"] == 0.0 and metrics["precision_at_threshold"] == 0.0


def test_threshold_is_the_highest_score_reaching_the_recall() -> None:
    truth = ImageTargets(Path("a.png"), 100, 100, [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50],
                                                   [60, 60, 70, 70]], [0, 0, 0, 0])
    found = Detections([[0, 0, 10, 10], [80, 80, 90, 90], [20, 20, 30, 30], [40, 41, 50, 50], [60, 60, 70, 70]],
                       [0.9, 0.8, 0.7, 0.3, 0.2], [0, 0, 0, 0, 1])  # the last has the wrong class
    assert threshold_for_recall([found], [truth], 0.5) == pytest.approx(0.7)
    assert threshold_for_recall([found], [truth], 0.75) == pytest.approx(0.3)
    assert threshold_for_recall([found], [truth], 1.0) == pytest.approx(0.2)  # unreachable: the most recall there is
    assert threshold_for_recall([Detections.empty()], [truth], 0.9) == 1.0


def test_the_bootstrap_ap50_agrees_with_torchmetrics() -> None:
    targets = _targets(8, seed=1)
    rng = np.random.default_rng(2)
    noisy = []
    for t in targets:
        boxes = np.concatenate([t.boxes + rng.normal(0, 2, t.boxes.shape), rng.uniform(0, 50, (2, 4)).cumsum(1)])
        noisy.append(Detections(boxes, rng.uniform(0, 1, len(boxes)), np.concatenate([t.labels, [0, 1]])))
    ours, _ = average_precision_50(match_all(noisy, targets, 2), 2)
    theirs = coco_map(noisy, targets, 2)["map_50"]
    assert 0.05 < theirs < 0.95 and ours == pytest.approx(theirs, abs=1e-6)
    metrics, _ = detection_metrics(noisy, targets, CLASSES, threshold=0.5)
    low, high = metrics["map_50"]["ci95"]
    assert low <= metrics["map_50"]["value"] <= high and low < high
