"""Metrics of an anomaly model on labelled images, and a self-contained HTML report.

Image level: AUROC, F1 at the saved threshold and at the best one. Pixel level, when masks exist
(at the model's input size, masks binarised as in data.py): AUROC over all pixels and AUPRO, the
mean per-region overlap integrated up to 30% false-positive rate and divided by 0.3 (MVTec AD's
metric). Good images count as all-normal pixels; defect images without a mask file are left out
of the pixel metrics (and counted), defect images with an empty mask are kept.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from visiontune.anomaly.base import AnomalyModel, Scores
from visiontune.anomaly.components.anomaly_map import heatmap_overlay
from visiontune.anomaly.components.threshold import best_f1_threshold, f1_at
from visiontune.anomaly.data import GOOD, LabelledImage, load_mask
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.validate import Skipped
from visiontune.errors import UserError
from visiontune.io import write_text_atomic

MAX_FPR = 0.3
GALLERY = 8  # worst misses and false alarms shown in the report
OUTLINE = (0, 255, 0)


def evaluate_model(model: AnomalyModel, images: list[LabelledImage], out: Path | None = None) -> dict:
    scored = model.score([image.path for image in images])
    by_path = {image.path: image for image in images}
    kept = [by_path[path] for path in scored.paths]
    labels = np.array([image.is_anomalous for image in kept], dtype=int)
    if labels.min(initial=1) == 1 or labels.max(initial=0) == 0:
        raise UserError("after skipping unreadable files, evaluation needs both good and defect images")
    scores, threshold = scored.scores, model.threshold_
    best_threshold, best_f1 = best_f1_threshold(scores, labels)
    metrics = {
        "images": len(kept), "good_images": int((labels == 0).sum()), "defect_images": int(labels.sum()),
        "image_auroc": float(roc_auc_score(labels, scores)),
        "threshold": threshold, "threshold_rule": model.threshold_rule_,
        "f1_at_threshold": f1_at(scores, labels, threshold),
        "recall_at_threshold": float((scores[labels == 1] >= threshold).mean()),
        "false_alarm_rate_at_threshold": float((scores[labels == 0] >= threshold).mean()),
        "best_threshold": best_threshold, "f1_at_best_threshold": best_f1,
    }
    masks, mask_skipped = _masks(kept, model)
    metrics |= _pixel_metrics(scored.maps, masks)
    metrics["per_defect_type"] = _per_type(kept, scores, labels, threshold, scored.maps, masks)
    metrics["skipped"] = [vars(s) for s in scored.skipped + mask_skipped]
    if out is not None:
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(out / "report.html", render_report(model, kept, scored, masks, metrics))
        metrics["report"] = str(out / "report.html")
    return metrics


def _masks(images: list[LabelledImage], model: AnomalyModel) -> tuple[list[np.ndarray | None], list[Skipped]]:
    """Per image: a boolean mask, all-False for good images, None where a defect has no usable mask."""
    size, masks, skipped = model.image_size, [], []
    for image in images:
        if not image.is_anomalous:
            masks.append(np.zeros((size, size), bool))
        elif image.mask is None:
            masks.append(None)
        else:
            try:
                masks.append(load_mask(image.mask, size, model.max_pixels))
            except ImageLoadError as exc:
                skipped.append(Skipped(str(image.mask), f"mask left out of pixel metrics: {exc}"))
                masks.append(None)
    return masks, skipped


def _pixel_metrics(maps: np.ndarray, masks: list[np.ndarray | None]) -> dict:
    result = {"defect_images_without_mask": sum(mask is None for mask in masks)}
    pixels = _with_masks(maps, masks)
    if pixels is None:
        return result | {"pixel_auroc": None, "aupro": None}
    selected, stacked = pixels
    return result | {"pixel_auroc": float(roc_auc_score(stacked.ravel(), selected.ravel())),
                     "aupro": aupro(selected, stacked)}


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


def _per_type(images: list[LabelledImage], scores: np.ndarray, labels: np.ndarray, threshold: float,
              maps: np.ndarray, masks: list[np.ndarray | None]) -> dict:
    """Each defect type against all good images."""
    good = labels == 0
    rows = {}
    for defect in sorted({image.defect for image in images} - {GOOD}):
        of_type = np.array([image.defect == defect for image in images])
        chosen = of_type | good
        chosen_masks = [mask if pick else None for mask, pick in zip(masks, chosen)]
        rows[defect] = {
            "images": int(of_type.sum()),
            "image_auroc": float(roc_auc_score(labels[chosen], scores[chosen])),
            "recall_at_threshold": float((scores[of_type] >= threshold).mean()),
            "mean_score": float(scores[of_type].mean()),
            "pixel_auroc": _pixel_auroc(maps, chosen_masks),
        }
    return rows


def render_report(model: AnomalyModel, images: list[LabelledImage], scored: Scores,
                  masks: list[np.ndarray | None], metrics: dict) -> str:
    """One HTML file, images embedded as base64 PNG: metrics, per-type table, worst cases."""
    scores, threshold = scored.scores, model.threshold_
    defects = [i for i, image in enumerate(images) if image.is_anomalous]
    goods = [i for i, image in enumerate(images) if not image.is_anomalous]
    misses = sorted(defects, key=lambda i: scores[i])[:GALLERY]
    alarms = sorted(goods, key=lambda i: -scores[i])[:GALLERY]
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    per_type = metrics["per_defect_type"]
    columns = ["images", "image_auroc", "recall_at_threshold", "mean_score", "pixel_auroc"]

    def card(i: int) -> str:
        image = images[i]
        verdict = "flagged" if scores[i] >= threshold else "passed"
        picture = _thumbnail(model, image.path, scored.maps[i], masks[i])
        return (f'<figure><img src="data:image/png;base64,{picture}"><figcaption>{html.escape(image.path.name)}'
                f"<br>{html.escape(image.defect)}: score {scores[i]:.4g} ({verdict})</figcaption></figure>")

    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items())
    type_rows = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{_fmt(row[c])}</td>" for c in columns) + "</tr>"
        for name, row in per_type.items()
    )
    title = f"{model.detector.method} on {model.extractor.backbone} ({', '.join(model.extractor.layers)}, {model.image_size} px)"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:.3em .6em;text-align:left}}figure{{display:inline-block;margin:.5em;width:260px;vertical-align:top}}
img{{width:256px}}figcaption{{font-size:.85em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Threshold {threshold:.4g} ({html.escape(json.dumps(model.threshold_rule_))}); an image is flagged when its
score is at or above it. Heat: cold at the median pixel score of the held-out good images, hot at the larger of their maximum and the image's own peak.
Green outlines: ground-truth masks.</p>
<h2>Metrics</h2><table>{rows}</table>
<h2>Per defect type (each against all good images)</h2>
<table><tr><th>type</th>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{type_rows}</table>
<h2>Worst misses (defects with the lowest scores)</h2>{''.join(card(i) for i in misses)}
<h2>False alarms (good images with the highest scores)</h2>{''.join(card(i) for i in alarms)}
</body></html>
"""


def _thumbnail(model: AnomalyModel, path: Path, anomaly_map: np.ndarray, mask: np.ndarray | None) -> str:
    size = model.image_size
    try:
        image = load_rgb(path, model.max_pixels).resize((size, size), Image.BILINEAR)
    except ImageLoadError:
        image = Image.new("RGB", (size, size), (128, 128, 128))
    pixels = np.array(heatmap_overlay(image, anomaly_map, *model.map_range_))
    if mask is not None and mask.any():
        pixels[mask & ~ndimage.binary_erosion(mask)] = OUTLINE
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("n/a" if value is None else str(value))
