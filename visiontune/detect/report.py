"""The detection evaluation page (RUN/eval/<split>/report.html): the metrics with their interval,
per-class AP, the precision-recall curves at IoU 0.5 (also pr_curves.png), and the images with the
most errors at the run's threshold, true boxes against predicted ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from visiontune.config import DEFAULT_MAX_PIXELS  # noqa: E402
from visiontune.data.images import ImageLoadError, load_rgb  # noqa: E402
from visiontune.detect.evaluation import ImageMatches  # noqa: E402
from visiontune.detect.types import Detections, ImageTargets  # noqa: E402
from visiontune.io import atomic_write  # noqa: E402
from visiontune.reporting.html import render_page  # noqa: E402

WORST = 6
PR_FILE = "pr_curves.png"


def pr_figure(curves: dict, per_class: dict):
    figure, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, precision in curves["precision"].items():
        if precision is not None:
            ax.plot(curves["recall"], precision, label=f"{name} (AP@0.5 {per_class[name]['ap_50'] or 0:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def boxes_figure(target: ImageTargets, detections: Detections, classes: list[str], threshold: float):
    """The image with its true boxes (green, solid) and the predictions at the threshold (red, dashed)."""
    try:
        image = np.asarray(load_rgb(target.path, DEFAULT_MAX_PIXELS))
    except ImageLoadError:
        image = np.zeros((target.height, target.width, 3), dtype=np.uint8)
    figure, ax = plt.subplots(figsize=(4, 4 * image.shape[0] / max(1, image.shape[1])))
    ax.imshow(image)
    for (x1, y1, x2, y2), label in zip(target.boxes, target.labels):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", linewidth=1.5))
        ax.text(x1, y1, classes[label], color="lime", fontsize=7, va="bottom")
    keep = detections.scores >= threshold
    for (x1, y1, x2, y2), label, score in zip(detections.boxes[keep], detections.labels[keep], detections.scores[keep]):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", linewidth=1.2, linestyle="--"))
        ax.text(x1, y2, f"{classes[label]} {score:.2f}", color="red", fontsize=7, va="top")
    ax.axis("off")
    figure.tight_layout()
    return figure


def write_report(run, result: dict, detections: Sequence[Detections], targets: Sequence[ImageTargets],
                 matches: Sequence[ImageMatches], out: Path) -> Path:
    metrics, threshold = result["metrics"], result["metrics"]["threshold"]
    errors = []
    for m in matches:
        above = m.scores >= threshold
        found = int(m.true_positive[above].sum())
        errors.append((int(m.truths.sum()) - found, int(above.sum()) - found))
    order = sorted(range(len(targets)), key=lambda i: -sum(errors[i]))
    worst = [i for i in order if sum(errors[i])][:WORST]
    figures = []
    try:
        curve = pr_figure(metrics["pr_curves"], metrics["per_class"])
        figures.append(curve)
        atomic_write(out / PR_FILE, lambda tmp: curve.savefig(tmp, format="png", dpi=90))
        entries = []
        for i in worst:
            figure = boxes_figure(targets[i], detections[i], run.classes, threshold)
            figures.append(figure)
            entries.append({"image": str(targets[i].path), "missed": errors[i][0], "false": errors[i][1],
                            "figure": figure})
        return render_page("detect.html", out / "report.html", title=f"Detection: {run.dir.name} ({result['split']})",
                           result=result, metrics=metrics, curve=curve, worst=entries)
    finally:
        for figure in figures:
            plt.close(figure)
