"""R-CNN's linear heads on constructed cases: box regression recovers a linear offset, the SVM
with hard-negative mining separates what is separable, Platt scaling is monotone."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

from visiontune.detect.region_heads import (
    decode_boxes,
    encode_boxes,
    fit_box_regressor,
    fit_platt,
    fit_svm,
    sigmoid,
)


def test_encode_and_decode_are_inverse_and_match_rcnn():
    proposals = np.array([[10, 10, 30, 50], [0, 0, 8, 8]], np.float32)
    truth = np.array([[12, 6, 32, 46], [0, 0, 16, 4]], np.float32)
    deltas = encode_boxes(proposals, truth)
    np.testing.assert_allclose(deltas[0], [2 / 20, -4 / 40, 0, 0], atol=1e-6)
    np.testing.assert_allclose(deltas[1], [4 / 8, -2 / 8, np.log(2), np.log(0.5)], atol=1e-6)
    np.testing.assert_allclose(decode_boxes(proposals, deltas), truth, atol=1e-4)


def test_box_regression_recovers_a_linear_offset():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 6)).astype(np.float32)
    mixing = rng.normal(scale=0.1, size=(6, 4))
    proposals = np.column_stack([rng.uniform(0, 100, (400, 2)), np.zeros((400, 2))]).astype(np.float32)
    proposals[:, 2:] = proposals[:, :2] + rng.uniform(20, 60, (400, 2))
    truth = decode_boxes(proposals, features @ mixing + [0.05, -0.05, 0.1, 0.0])
    weight, bias = fit_box_regressor(features, proposals, truth, alpha=1e-3)
    np.testing.assert_allclose(weight, mixing.T, atol=1e-3)
    np.testing.assert_allclose(bias, [0.05, -0.05, 0.1, 0.0], atol=1e-3)
    moved = decode_boxes(proposals, features @ weight.T + bias)
    assert np.abs(moved - truth).max() < 0.1


def test_svm_with_mining_separates_and_keeps_the_working_set_bounded():
    rng = np.random.default_rng(1)
    positives = rng.normal(loc=2.0, size=(30, 5)).astype(np.float32)
    negatives = rng.normal(loc=-2.0, size=(3000, 5)).astype(np.float32)
    weight, bias = fit_svm(positives, negatives, c=0.1, rounds=2, max_negatives=200, seed=0)
    assert (positives @ weight + bias > 0).mean() > 0.95 and (negatives @ weight + bias < 0).mean() > 0.99
    again = fit_svm(positives, negatives, c=0.1, rounds=2, max_negatives=200, seed=0)
    np.testing.assert_array_equal(again[0], weight)


def test_platt_is_increasing_and_calibrated_to_the_positive_share():
    scores = np.linspace(-3, 3, 200)
    positive = scores + np.random.default_rng(2).normal(scale=1.0, size=200) > 0
    a, b = fit_platt(scores, positive)
    assert a > 0 and abs(b / a) < 0.5  # the scores' own boundary (0) stays near even odds
    assert abs(float(sigmoid(a * scores + b).mean()) - positive.mean()) < 0.02
    assert fit_platt(scores, np.ones(200, bool)) == (1.0, 0.0)


def test_nms_keeps_the_best_of_overlapping_boxes_of_one_class_but_not_across_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.6, 0.9, 0.8, 0.3])
    labels = torch.tensor([0, 0, 1, 0])
    keep = batched_nms(boxes, scores, labels, 0.3)
    assert keep.tolist() == [1, 2, 3]  # box 0 loses to box 1 (same class); box 2 is another class
