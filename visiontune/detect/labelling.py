"""Proposals labelled by their overlap with the true boxes, and regions cut out as R-CNN warps them.

A proposal overlapping a true box by at least `iou_pos` is that box's class; one overlapping
every true box by less than `iou_neg` is background; those in between are ambiguous and left out.
The true boxes themselves are positives too. Negatives are capped per image, the ones that
overlap most first: they are the hard ones a classifier learns most from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou as _torch_box_iou

from visiontune.detect.types import ImageTargets

BACKGROUND = "background"  # the negative class, as a folder / CSV label and in a classifier run's labels
BACKGROUND_LABEL = -1  # the label index of background regions (ImageTargets' labels start at 0)
FROM_GROUND_TRUTH = -1  # proposal_index of a region that is a true box, not a proposal


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU `[len(a), len(b)]` of xyxy boxes (touching boxes: 0)."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float32).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4))
    return _torch_box_iou(a, b).numpy()


def reached(proposals: np.ndarray, targets: ImageTargets, iou: float = 0.5) -> np.ndarray:
    """bool [number of true boxes]: whether some proposal overlaps each true box by `iou` or more.
    A true box no proposal reaches is one no classifier or SVM on the proposals can find."""
    if len(targets.boxes) == 0 or len(proposals) == 0:
        return np.zeros(len(targets.boxes), dtype=bool)
    return box_iou(targets.boxes, proposals).max(axis=1) >= iou


@dataclass(frozen=True)
class LabelledRegions:
    """The regions of one image kept for training, true boxes first, then positive proposals in
    proposal order, then negatives by decreasing IoU."""

    boxes: np.ndarray  # float32 [M, 4] xyxy
    labels: np.ndarray  # int64 [M]: class index, or BACKGROUND_LABEL
    iou: np.ndarray  # float32 [M]: the IoU with the matched true box (1 for true boxes)
    gt_index: np.ndarray  # int64 [M]: the matched true box (highest IoU), -1 if the image has none
    proposal_index: np.ndarray  # int64 [M]: the row in the proposals, FROM_GROUND_TRUTH for true boxes


def match_proposals(proposals: np.ndarray, targets: ImageTargets) -> tuple[np.ndarray, np.ndarray]:
    """(highest IoU with any true box, that box's index) per proposal; (0, -1) without true boxes."""
    if len(targets.boxes) == 0 or len(proposals) == 0:
        return np.zeros(len(proposals), np.float32), np.full(len(proposals), -1, np.int64)
    overlaps = box_iou(proposals, targets.boxes)
    return overlaps.max(axis=1).astype(np.float32), overlaps.argmax(axis=1).astype(np.int64)


def label_proposals(proposals: np.ndarray, targets: ImageTargets, iou_pos: float = 0.5, iou_neg: float = 0.3,
                    max_negatives_per_image: int | None = 32, include_ground_truth: bool = True) -> LabelledRegions:
    """Positives (IoU >= iou_pos, labelled with the matched box's class), background (IoU < iou_neg,
    the `max_negatives_per_image` with the highest IoU), the true boxes (IoU 1) when asked."""
    if not 0 <= iou_neg <= iou_pos <= 1:
        raise ValueError(f"need 0 <= iou_neg <= iou_pos <= 1 (got {iou_neg}, {iou_pos})")
    proposals = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    iou, gt = match_proposals(proposals, targets)
    positive = np.flatnonzero((iou >= iou_pos) & (gt >= 0))
    negative = np.flatnonzero(iou < iou_neg)
    negative = negative[np.argsort(-iou[negative], kind="stable")][:max_negatives_per_image]
    n_gt = len(targets.boxes) if include_ground_truth else 0
    chosen = np.concatenate([positive, negative])
    return LabelledRegions(
        boxes=np.concatenate([targets.boxes[:n_gt], proposals[chosen]]).astype(np.float32),
        labels=np.concatenate([targets.labels[:n_gt], targets.labels[gt[positive]],
                               np.full(len(negative), BACKGROUND_LABEL)]).astype(np.int64),
        iou=np.concatenate([np.ones(n_gt), iou[chosen]]).astype(np.float32),
        gt_index=np.concatenate([np.arange(n_gt), gt[chosen]]).astype(np.int64),
        proposal_index=np.concatenate([np.full(n_gt, FROM_GROUND_TRUTH), chosen]).astype(np.int64),
    )


def context_box(box: np.ndarray, size: int = 224, context: int = 16) -> np.ndarray:
    """The box grown so that, warped to `size`, the original box fills the centre `size - 2 * context`
    pixels and `context` pixels of its surroundings lie on each side (R-CNN's padding)."""
    if not 0 <= 2 * context < size:
        raise ValueError(f"context {context} leaves nothing of a {size}-pixel crop")
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    pad_x, pad_y = w * context / (size - 2 * context), h * context / (size - 2 * context)
    return np.array([x1 - pad_x, y1 - pad_y, x1 + w + pad_x, y1 + h + pad_y], dtype=np.float32)


def crop_region(image: np.ndarray | Image.Image, box: np.ndarray, size: int = 224, context: int = 16,
                fill: tuple[int, int, int] | None = None) -> np.ndarray:
    """The box with its context warped (aspect not kept) to an RGB uint8 `size x size` array; what
    falls outside the image is `fill`, by default the image's mean colour (0 after normalisation
    by a similar mean)."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if fill is None:
        fill = tuple(round(v) for v in np.asarray(picture).reshape(-1, 3).mean(axis=0))
    extent = tuple(float(v) for v in context_box(box, size, context))
    warped = picture.transform((size, size), Image.Transform.EXTENT, data=extent,
                               resample=Image.Resampling.BILINEAR, fillcolor=fill)
    return np.asarray(warped)
