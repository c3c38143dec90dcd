"""Evaluation figures as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

import functools
import itertools
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from visiontune.data.images import ImageLoadError, load_rgb  # noqa: E402
from visiontune.io import atomic_write

THUMBNAIL = 160
SCORE_BINS = 30
TAB10_GREY = 7  # kept for the negatives
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")  # one per class, cycled beyond ten
LEGEND_CLASSES = 20  # classes named in an embedding's legend
# Fonts with CJK glyphs, tried glyph by glyph after DejaVu Sans when installed, so that class names
# in any script are drawn; where none is installed, missing glyphs are boxes, without a warning.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
                  "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback",
                  "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans", "Malgun Gothic",
                  "Yu Gothic", "Arial Unicode MS", "Noto Sans")


def confusion_matrix_png(matrix: dict, path: Path) -> None:
    labels, counts = matrix["labels"], np.array(matrix["counts"])
    normalized = np.array(matrix["normalized"])
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            colour = "white" if normalized[i, j] > 0.5 else "black"
            ax.text(j, i, f"{counts[i, j]}\n{normalized[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=9)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="actual",
           title="confusion matrix (count, row %)")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    _save(fig, path)


def binary_curves_png(curves: dict, positive: str, path: Path) -> None:
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    roc.plot(curves["roc"]["fpr"], curves["roc"]["tpr"])
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(title=f"ROC, AUC {curves['roc_auc']:.3f}", xlabel="false positive rate", ylabel="true positive rate")
    pr.plot(curves["pr"]["recall"], curves["pr"]["precision"])
    pr.set(title=f"precision-recall, AP {curves['average_precision']:.3f}", xlabel=f"recall ({positive})",
           ylabel="precision", ylim=(0, 1.02))
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
    _save(fig, path)


def reliability_png(calibration: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, values in calibration.items():
        bins = values["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                label=f"{name}: ECE {values['ece']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability diagram", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def prediction_grid_png(rows: list[dict], title: str, path: Path, max_pixels: int) -> None:
    """Thumbnails with actual / predicted / probability of the prediction, as in fastai's top losses."""
    cols = min(4, max(1, len(rows)))
    n_rows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(3 * cols, 3.3 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        try:
            image = load_rgb(row["path"], max_pixels)
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            ax.imshow(image)
        except ImageLoadError:
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ok = row["actual"] == row["predicted"]
        ax.set_title(f"{row['actual']} -> {row['predicted']}\np={row['probability']:.2f} loss={row['loss']:.2f}",
                     fontsize=9, color="green" if ok else "red")
    fig.suptitle(title)
    _save(fig, path)


def stress_png(stress: dict, path: Path) -> None:
    """Accuracy under each perturbation with its 95% CI, against the clean accuracy and chance."""
    rows = stress["perturbations"]
    accuracy = np.array([row["accuracy"] for row in rows])
    errors = np.abs(np.array([row["ci"] for row in rows]).T - accuracy)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
    ax.barh(range(len(rows)), accuracy, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.axvline(stress["clean_accuracy"], color="black", linestyle="--", label="clean accuracy")
    ax.axvline(stress["chance"], color="grey", linestyle=":", label="chance (commonest class)")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([row["name"] for row in rows])
    ax.invert_yaxis()
    ax.set(xlabel="accuracy (95% CI)", xlim=(0, 1.02), title="accuracy under perturbation")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def embedding_png(points: np.ndarray, groups: np.ndarray, classes: np.ndarray, labels: list[str], title: str,
                  path: Path) -> None:
    """A 2-D embedding coloured by group (source, target) and marked by class (index into
    `labels`): whether the groups mix or separate, and which classes part ways."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    colours = plt.get_cmap("tab10").colors
    names = list(dict.fromkeys(groups.tolist()))
    for g, name in enumerate(names):
        for c in range(len(labels)):
            mask = (groups == name) & (classes == c)
            ax.scatter(points[mask, 0], points[mask, 1], s=22, color=colours[g % len(colours)],
                       marker=MARKERS[c % len(MARKERS)], alpha=0.7, linewidths=0)
    handles = [Line2D([], [], linestyle="", marker="o", color=colours[g % len(colours)], label=f"{name} "
                      f"({int((groups == name).sum())})") for g, name in enumerate(names)]
    handles += [Line2D([], [], linestyle="", marker=MARKERS[c % len(MARKERS)], color="black", label=label)
                for c, label in enumerate(labels[:LEGEND_CLASSES])]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set(title=title, xticks=[], yticks=[])
    _save(fig, path)


def score_histogram_png(groups: dict[str, np.ndarray], threshold: float, caption: str, path: Path) -> None:
    """Histograms of scores per group (the first, the negatives, filled grey; the others in colour)
    on shared bins, with a vertical line at the decision `threshold`, so that one sees what it
    flags of each: anomaly scores of good images and of each defect type."""
    values = np.concatenate(list(groups.values()))
    low, high = min(values.min(), threshold), max(values.max(), threshold)
    edges = np.linspace(low, high if high > low else low + 1, SCORE_BINS + 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = itertools.cycle(c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != TAB10_GREY)
    for i, (name, scores) in enumerate(groups.items()):
        style = ({"histtype": "stepfilled", "color": "grey", "alpha": 0.5} if i == 0
                 else {"histtype": "step", "color": next(colours), "linewidth": 1.8})
        ax.hist(scores, bins=edges, label=f"{name} ({len(scores)})", **style)
    ax.axvline(threshold, color="black", linestyle="--", label=caption)
    ax.set(xlabel="score", ylabel="images", title="scores and the decision threshold")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Lay out and write `fig` with the fallback fonts; glyph warnings would only clutter a run's log."""
    with plt.rc_context({"font.sans-serif": _sans_serif()}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


@functools.cache
def _sans_serif() -> list[str]:
    installed = {font.name for font in font_manager.fontManager.ttflist}
    default = list(matplotlib.rcParams["font.sans-serif"])
    return default[:1] + [name for name in FALLBACK_FONTS if name in installed] + default[1:]
