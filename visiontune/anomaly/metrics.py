"""Metrics of an anomaly model on labelled images, as plain numbers (evaluate.py reports them).

Image level: AUROC, F1 at the saved threshold and at the best one, recall and false-alarm rate at
the saved threshold with 95% Wilson score intervals (deterministic, inside [0, 1] and sound for
the few defect images of a type, where the normal approximation fails at 0 or all of them).
Pixel level, when masks exist: AUROC over all pixels and AUPRO, the mean per-region overlap
integrated up to 30% false-positive rate and divided by 0.3 (MVTec AD's metric). Masks are
boolean [h, w] arrays at the maps' size: all-False for good images, None for defect images
without a usable mask, which are left out of the pixel metrics (and counted); defect images with
an empty mask are kept.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from visiontune.anomaly.components.threshold import (
    best_f1_threshold,
    f1_at,
    flagged_share,
)

MAX_FPR = 0.3
CONFIDENCE = 0.95
INTERVAL_METHOD = "wilson"


def image_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float, rule: dict) -> dict:
    """Counts, AUROC and F1 of image scores; labels 1 = anomalous, flagged when score >= threshold
    (recorded with the `rule` that chose it)."""
    best_threshold, best_f1 = best_f1_threshold(scores, labels)
    return {
        "images": len(labels), "good_images": int((labels == 0).sum()), "defect_images": int(labels.sum()),
        "image_auroc": float(roc_auc_score(labels, scores)),
        "threshold": threshold, "threshold_rule": rule,
        "f1_at_threshold": f1_at(scores, labels, threshold),
        "recall_at_threshold": flagged_share(scores[labels == 1], threshold),
        "false_alarm_rate_at_threshold": flagged_share(scores[labels == 0], threshold),
        "best_threshold": best_threshold, "f1_at_best_threshold": best_f1,
        "recall_at_threshold_ci95": flagged_share_ci95(scores[labels == 1], threshold),
        "false_alarm_rate_at_threshold_ci95": flagged_share_ci95(scores[labels == 0], threshold),
        "ci95_method": "Wilson score interval",
    }


def flagged_share_ci95(scores: np.ndarray, threshold: float) -> list[float]:
    """[low, high]: the 95% interval of the share of images like these flagged at `threshold`."""
    interval = binomtest(int((scores >= threshold).sum()), len(scores)).proportion_ci(CONFIDENCE, INTERVAL_METHOD)
    return [float(interval.low), float(interval.high)]


def pixel_metrics(maps: np.ndarray, masks: list[np.ndarray | None]) -> dict:
    result = {"defect_images_without_mask": sum(mask is None for mask in masks)}
    pixels = _with_masks(maps, masks)
    if pixels is None:
        return result | {"pixel_auroc": None, "aupro": None}
    selected, stacked = pixels
    return result | {"pixel_auroc": float(roc_auc_score(stacked.ravel(), selected.ravel())),
                     "aupro": aupro(selected, stacked)}


def per_defect_type(defects: list[str], scores: np.ndarray, labels: np.ndarray, threshold: float,
                    maps: np.ndarray, masks: list[np.ndarray | None]) -> dict:
    """Each defect type (`defects`: per image, the type or GOOD) against all good images, so its
    false-alarm rate is that of all good images."""
    good = labels == 0
    false_alarms = {"false_alarm_rate_at_threshold": flagged_share(scores[good], threshold),
                    "false_alarm_rate_at_threshold_ci95": flagged_share_ci95(scores[good], threshold)}
    rows = {}
    for defect in sorted({d for d, label in zip(defects, labels) if label == 1}):
        of_type = np.array([d == defect for d in defects])
        chosen = of_type | good
        chosen_masks = [mask if pick else None for mask, pick in zip(masks, chosen)]
        rows[defect] = {
            "images": int(of_type.sum()),
            "image_auroc": float(roc_auc_score(labels[chosen], scores[chosen])),
            "recall_at_threshold": flagged_share(scores[of_type], threshold),
            "mean_score": float(scores[of_type].mean()),
            "pixel_auroc": _pixel_auroc(maps, chosen_masks),
            "recall_at_threshold_ci95": flagged_share_ci95(scores[of_type], threshold),
            **false_alarms,
        }
    return rows


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """Normalised area under the per-region-overlap curve up to `max_fpr`; maps, masks [n, h, w].

    Regions are the 8-connected components of each mask. Sorting all pixels by score once gives
    the exact curve: a normal pixel raises the false-positive rate by 1 / normal pixels, a region
    pixel raises the mean overlap by 1 / (its region's size x number of regions).
    """
    regions = np.zeros(masks.shape, np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labelled, found = ndimage.label(mask, structure=np.ones((3, 3)))
        regions[i] = np.where(labelled > 0, labelled + count, 0)
        count += found
    flat_regions, flat_scores = regions.ravel(), maps.ravel()
    sizes = np.bincount(flat_regions, minlength=count + 1)
    if count == 0 or sizes[0] == 0:
        return float("nan")
    order = np.argsort(-flat_scores, kind="stable")
    ordered_regions, ordered_scores = flat_regions[order], flat_scores[order]
    normal = ordered_regions == 0
    fpr = np.cumsum(normal) / sizes[0]
    pro = np.cumsum(np.where(normal, 0.0, 1.0 / (sizes[ordered_regions] * count)))
    last_of_ties = np.r_[ordered_scores[1:] != ordered_scores[:-1], True]
    fpr, pro = np.r_[0.0, fpr[last_of_ties]], np.r_[0.0, pro[last_of_ties]]
    inside = fpr <= max_fpr
    x = np.r_[fpr[inside], max_fpr]
    y = np.r_[pro[inside], np.interp(max_fpr, fpr, pro)]
    return float(np.trapezoid(y, x) / max_fpr)


def _with_masks(maps: np.ndarray, masks: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """(maps, masks) of the images that have a mask, or None when no mask marks any pixel."""
    with_mask = [i for i, mask in enumerate(masks) if mask is not None]
    if not with_mask:
        return None
    stacked = np.stack([masks[i] for i in with_mask])
    return (maps[with_mask], stacked) if stacked.any() else None


def _pixel_auroc(maps: np.ndarray, masks: list[np.ndarray | None]) -> float | None:
    pixels = _with_masks(maps, masks)
    return None if pixels is None else float(roc_auc_score(pixels[1].ravel(), pixels[0].ravel()))
