"""Scoring detections against true boxes: COCO mAP by torchmetrics (pycocotools backend), the
recall and precision at a run's score threshold, the threshold that reaches a target recall, and a
bootstrap interval for mAP@0.5.

The point estimates are torchmetrics'. Recall at a threshold, the threshold choice and the
bootstrap use one greedy COCO-style matching (per image and class, highest score first, each
prediction to the unmatched true box it overlaps most with IoU >= 0.5), done once; a bootstrap
resample of images only re-weights those per-image matches, so 200 resamples cost milliseconds
instead of 200 COCO evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from visiontune.detect.types import Detections, ImageTargets

IOU = 0.5
RECALL_POINTS = np.linspace(0, 1, 101)  # COCO's interpolation
BOOTSTRAP = 200


@dataclass
class ImageMatches:
    """One image's predictions marked true or false positive at IoU 0.5, and its true-box count per class."""

    scores: np.ndarray  # float [P]
    labels: np.ndarray  # int [P]
    true_positive: np.ndarray  # bool [P]
    truths: np.ndarray  # int [classes]


def match_image(detections: Detections, target: ImageTargets, num_classes: int, iou: float = IOU) -> ImageMatches:
    order = np.argsort(-detections.scores, kind="stable")
    boxes, scores, labels = detections.boxes[order], detections.scores[order], detections.labels[order]
    hit = np.zeros(len(scores), dtype=bool)
    if len(scores) and len(target.boxes):
        overlaps = box_iou(torch.from_numpy(boxes), torch.from_numpy(target.boxes)).numpy()
        overlaps[labels[:, None] != target.labels[None, :]] = -1  # only boxes of the same class match
        taken = np.zeros(len(target.boxes), dtype=bool)
        for p in range(len(scores)):
            candidates = np.where(taken, -1, overlaps[p])
            best = int(np.argmax(candidates))
            if candidates[best] >= iou:
                taken[best] = hit[p] = True
    truths = np.bincount(target.labels, minlength=num_classes)[:num_classes]
    return ImageMatches(scores, labels, hit, truths)


def match_all(detections: Sequence[Detections], targets: Sequence[ImageTargets], num_classes: int,
              iou: float = IOU) -> list[ImageMatches]:
    return [match_image(d, t, num_classes, iou) for d, t in zip(detections, targets)]


def average_precision_50(matches: Sequence[ImageMatches], num_classes: int) -> tuple[float, list[float | None]]:
    """mAP@0.5 and per-class AP@0.5 (None for a class without true boxes), COCO's 101-point interpolation."""
    scores = np.concatenate([m.scores for m in matches]) if matches else np.zeros(0)
    labels = np.concatenate([m.labels for m in matches]) if matches else np.zeros(0, dtype=int)
    hits = np.concatenate([m.true_positive for m in matches]) if matches else np.zeros(0, dtype=bool)
    truths = np.sum([m.truths for m in matches], axis=0) if matches else np.zeros(num_classes, dtype=int)
    per_class: list[float | None] = []
    for k in range(num_classes):
        if truths[k] == 0:
            per_class.append(None)
            continue
        mine = labels == k
        order = np.argsort(-scores[mine], kind="mergesort")
        tp = np.cumsum(hits[mine][order])
        fp = np.cumsum(~hits[mine][order])
        recall = tp / truths[k]
        precision = np.maximum.accumulate((tp / np.maximum(tp + fp, 1))[::-1])[::-1]
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        per_class.append(float(np.mean(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)],
                                                0.0))) if len(precision) else 0.0)
    present = [ap for ap in per_class if ap is not None]
    return (float(np.mean(present)) if present else 0.0), per_class


def bootstrap_map50(matches: Sequence[ImageMatches], num_classes: int, resamples: int = BOOTSTRAP,
                    seed: int = 0) -> list[float]:
    """95% percentile interval of mAP@0.5 over images resampled with replacement."""
    if not matches or resamples <= 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    values = [average_precision_50([matches[i] for i in rng.integers(0, len(matches), len(matches))], num_classes)[0]
              for _ in range(resamples)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def recall_precision_at(matches: Sequence[ImageMatches], threshold: float) -> tuple[float, float]:
    """Recall and precision at IoU 0.5 of the predictions scoring at least `threshold`."""
    kept = [(m.true_positive[m.scores >= threshold]) for m in matches]
    found = sum(int(k.sum()) for k in kept)
    predicted = sum(len(k) for k in kept)
    truths = sum(int(m.truths.sum()) for m in matches)
    return (found / truths if truths else 0.0), (found / predicted if predicted else 0.0)


def threshold_for_recall(detections: Sequence[Detections], targets: Sequence[ImageTargets], target_recall: float,
                         iou: float = IOU) -> float:
    """The highest score threshold whose recall at IoU `iou` reaches `target_recall` (choose it on
    validation only). Where no threshold reaches it, the lowest predicted score (the most recall
    there is); with no prediction at all, 1.0."""
    num_classes = max([int(t.labels.max()) + 1 for t in targets if len(t.labels)] +
                      [int(d.labels.max()) + 1 for d in detections if len(d.labels)] + [1])
    matches = match_all(detections, targets, num_classes, iou)
    scores = np.concatenate([m.scores for m in matches]) if matches else np.zeros(0)
    if not len(scores):
        return 1.0
    hits = np.concatenate([m.true_positive for m in matches])
    truths = sum(int(m.truths.sum()) for m in matches)
    order = np.argsort(-scores, kind="mergesort")
    recall = np.cumsum(hits[order]) / max(truths, 1)
    reached = np.nonzero(recall >= target_recall - 1e-12)[0]
    if not len(reached):
        return float(scores[order][-1])
    return float(scores[order][reached[0]])


def coco_map(detections: Sequence[Detections], targets: Sequence[ImageTargets], num_classes: int) -> dict:
    """torchmetrics' COCO numbers: mAP@[.5:.95], mAP@0.5, mAP@0.75, per-class AP@[.5:.95], and the
    precision at each of 101 recall points at IoU 0.5 per class (the PR curves)."""
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=True,
                                  backend="pycocotools")

    def as_torch(boxes, labels, scores=None) -> dict:
        out = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}
        return out | ({"scores": torch.from_numpy(scores)} if scores is not None else {})

    metric.update([as_torch(d.boxes, d.labels, d.scores) for d in detections],
                  [as_torch(t.boxes, t.labels) for t in targets])
    result = metric.compute()
    present = [int(c) for c in torch.atleast_1d(result["classes"]).tolist()]
    per_class: list[float | None] = [None] * num_classes
    curves: list[list[float] | None] = [None] * num_classes
    for j, k in enumerate(present):
        if 0 <= k < num_classes:
            value = float(torch.atleast_1d(result["map_per_class"])[j])
            per_class[k] = value if value >= 0 else None
            curve = result["precision"][0, :, j, 0, -1].numpy()  # IoU 0.5, all areas, 100 detections
            curves[k] = np.clip(curve, 0, None).tolist() if (curve >= 0).any() else None
    clean = lambda v: max(0.0, float(v))  # noqa: E731  torchmetrics' -1 (nothing to score) counts as 0
    return {"map": clean(result["map"]), "map_50": clean(result["map_50"]), "map_75": clean(result["map_75"]),
            "ap_per_class": per_class, "pr_curves": curves}


def detection_metrics(detections: Sequence[Detections], targets: Sequence[ImageTargets], classes: list[str],
                      threshold: float, bootstrap: int = BOOTSTRAP, seed: int = 0) -> tuple[dict, list[ImageMatches]]:
    """The numbers of metrics.json, and the per-image matches (the report's worst images)."""
    matches = match_all(detections, targets, len(classes))
    coco = coco_map(detections, targets, len(classes))
    _, ap50 = average_precision_50(matches, len(classes))
    recall, precision = recall_precision_at(matches, threshold)
    metrics = {
        "map_50": {"value": coco["map_50"], "ci95": bootstrap_map50(matches, len(classes), bootstrap, seed)},
        "map": coco["map"], "map_75": coco["map_75"],
        "per_class": {name: {"ap_50": ap50[k], "ap": coco["ap_per_class"][k],
                             "boxes": int(sum(m.truths[k] for m in matches))} for k, name in enumerate(classes)},
        "threshold": threshold, "recall_at_threshold": recall, "precision_at_threshold": precision,
        "pr_curves": {"recall": np.round(RECALL_POINTS, 2).tolist(),
                      "precision": {name: coco["pr_curves"][k] for k, name in enumerate(classes)}},
    }
    return metrics, matches
