"""IoU labelling of proposals and R-CNN's context crops, on hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visiontune.detect.labelling import (
    BACKGROUND_LABEL,
    FROM_GROUND_TRUTH,
    box_iou,
    context_box,
    crop_region,
    label_proposals,
    reached,
)
from visiontune.detect.types import ImageTargets


def targets(boxes, labels) -> ImageTargets:
    return ImageTargets(Path("t.png"), 100, 100, np.array(boxes, np.float32), np.array(labels))


def test_iou_of_hand_computed_pairs():
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 5, 5], [20, 20, 30, 30]])
    assert iou.shape == (1, 5)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.25, 0.0], rtol=1e-6)  # touching boxes: 0


def test_positives_background_and_the_ignored_band():
    truth = targets([[0, 0, 10, 10], [50, 50, 70, 70]], [1, 0])
    proposals = np.array([
        [0, 0, 10, 8],      # IoU 0.8 with box 0: class 1
        [5, 0, 15, 10],     # IoU 1/3: between 0.3 and 0.5, ignored
        [0, 0, 5, 5],       # IoU 0.25: background
        [50, 50, 70, 68],   # IoU 0.9 with box 1: class 0
        [10, 0, 20, 10],    # touching box 0: IoU 0, background
    ], np.float32)
    regions = label_proposals(proposals, truth, iou_pos=0.5, iou_neg=0.3)
    assert regions.proposal_index.tolist() == [FROM_GROUND_TRUTH, FROM_GROUND_TRUTH, 0, 3, 2, 4]
    assert regions.labels.tolist() == [1, 0, 1, 0, BACKGROUND_LABEL, BACKGROUND_LABEL]
    np.testing.assert_allclose(regions.iou, [1, 1, 0.8, 0.9, 0.25, 0], rtol=1e-6)
    assert regions.gt_index.tolist() == [0, 1, 0, 1, 0, 0]
    np.testing.assert_array_equal(regions.boxes[:2], truth.boxes)


def test_negatives_sorted_by_iou_and_capped_without_ground_truth():
    truth = targets([[0, 0, 10, 10]], [0])
    proposals = np.array([[50, 50, 60, 60], [0, 0, 5, 5], [0, 0, 10, 2], [60, 60, 90, 90]], np.float32)
    regions = label_proposals(proposals, truth, max_negatives_per_image=2, include_ground_truth=False)
    assert regions.proposal_index.tolist() == [1, 2]  # IoU 0.25, then 0.2; the two at 0 are left out
    assert regions.labels.tolist() == [BACKGROUND_LABEL] * 2
    assert len(label_proposals(proposals, truth, max_negatives_per_image=None).boxes) == 5


def test_an_image_without_boxes_gives_only_capped_background():
    empty = targets(np.zeros((0, 4)), [])
    regions = label_proposals(np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 9, 9]]), empty, max_negatives_per_image=2)
    assert regions.labels.tolist() == [BACKGROUND_LABEL] * 2 and regions.gt_index.tolist() == [-1, -1]
    assert regions.proposal_index.tolist() == [0, 1]


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError):
        label_proposals(np.zeros((0, 4)), targets([[0, 0, 1, 1]], [0]), iou_pos=0.3, iou_neg=0.5)


def test_context_box_leaves_context_pixels_around_the_warped_box():
    grown = context_box(np.array([10, 20, 110, 70]), size=224, context=16)
    # 100 x 50 box: padded by 100 * 16 / 192 and 50 * 16 / 192 on each side
    np.testing.assert_allclose(grown, [10 - 100 / 12, 20 - 50 / 12, 110 + 100 / 12, 70 + 50 / 12], rtol=1e-5)


def test_crop_region_warps_the_box_to_the_centre_and_fills_outside_the_image():
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 10:30] = 255
    crop = crop_region(image, np.array([10, 10, 30, 30]), size=40, context=10, fill=(7, 8, 9))
    assert crop.shape == (40, 40, 3) and crop.dtype == np.uint8
    assert (crop[10:30, 10:30] == 255).all() and (crop[:10] == 0).all() and (crop[:, 30:] == 0).all()
    edge = crop_region(image, np.array([0, 0, 20, 20]), size=40, context=10, fill=(7, 8, 9))
    assert (edge[:10, :, 0] == 7).all() and (edge[:, :10, 2] == 9).all()  # beyond the image: the fill
    assert (edge[10:20, 10:20] == 0).all() and (edge[20:30, 20:30] == 255).all()
    default = crop_region(image, np.array([0, 0, 20, 20]), size=40, context=10)
    assert (default[0, 0] == round(255 * 400 / 1600)).all()  # the image's mean colour


def test_crop_region_warps_without_keeping_the_aspect():
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, :30] = 200
    crop = crop_region(image, np.array([0, 0, 60, 20]), size=32, context=0)
    assert crop.shape == (32, 32, 3) and (crop[:, :15] == 200).all() and (crop[:, 17:] == 0).all()


def test_reached_marks_the_true_boxes_some_proposal_overlaps_enough():
    targets = ImageTargets(Path("x.png"), 100, 100, np.array([[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]],
                                                             np.float32), [0, 1, 1])
    proposals = np.array([[0, 0, 10, 10],  # IoU 1 with the first box
                          [50, 50, 60, 55],  # IoU 0.5 with the second: reached at 0.5, not at 0.6
                          [85, 85, 95, 95]], np.float32)  # IoU 25 / 175 = 0.14 with the third
    assert reached(proposals, targets, 0.5).tolist() == [True, True, False]
    assert reached(proposals, targets, 0.6).tolist() == [True, False, False]
    assert reached(np.zeros((0, 4), np.float32), targets).tolist() == [False, False, False]
    assert reached(proposals, ImageTargets(Path("y.png"), 10, 10, np.zeros((0, 4)), [])).tolist() == []
