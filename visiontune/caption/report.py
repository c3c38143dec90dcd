"""The caption evaluation page (RUN/eval/<split>/report.html): corpus metrics with their intervals,
the training curve, then the best, the worst and a few seeded examples, each with its references
and the decoder's attention over the image for every generated word."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visiontune.caption.encoder import EncoderSpec  # noqa: E402
from visiontune.data.images import ImageLoadError, load_rgb  # noqa: E402
from visiontune.data.transforms import Preprocessing  # noqa: E402
from visiontune.reporting.html import render_page  # noqa: E402
from visiontune.runformat import METRICS_FILE  # noqa: E402

SHOWN = 4  # best, worst and examples each
MAX_WORDS = 12
METRIC_ORDER = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")


def attention_figure(image_path: str, words: list[str], attention: np.ndarray, grid: tuple[int, int],
                     input_size: int):
    """The image, then one panel per word with its attention over the grid cells laid on top."""
    try:
        image = np.asarray(load_rgb(image_path, max_pixels=10**8).resize((input_size, input_size)))
    except ImageLoadError:
        image = np.zeros((input_size, input_size, 3), dtype=np.uint8)
    words = words[:MAX_WORDS]
    figure, axes = plt.subplots(1, len(words) + 1, figsize=(1.6 * (len(words) + 1), 1.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    for ax, word, weights in zip(axes[1:], words, attention):
        ax.imshow(image)
        ax.imshow(weights.reshape(grid), cmap="jet", alpha=0.5, extent=(0, input_size, input_size, 0),
                  interpolation="bilinear" if grid != (1, 1) else "nearest")
        ax.set_title(word, fontsize=8)
    for ax in axes:
        ax.axis("off")
    figure.tight_layout()
    return figure


def _curve(run_dir: Path):
    path = run_dir / METRICS_FILE
    rows = list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
    left.plot(epochs, [float(r["train_loss"]) for r in rows])
    left.set(xlabel="epoch", ylabel="train loss")
    right.plot(epochs, [float(r["val_cider"]) for r in rows], label="CIDEr-D")
    right.plot(epochs, [float(r["val_bleu4"]) for r in rows], label="BLEU-4")
    right.set(xlabel="epoch", ylabel="validation (greedy)")
    right.legend()
    figure.tight_layout()
    return figure


def write_report(run_dir: Path, preprocessing: Preprocessing, spec: EncoderSpec, result: dict, captions: list,
                 refs: dict[str, list[str]], per_image: dict[str, np.ndarray], path: Path) -> Path:
    order = np.argsort(-per_image["cider"], kind="stable")
    examples = np.random.default_rng(0).permutation(len(captions))[:SHOWN]
    figures = []

    def entries(indices) -> list[dict]:
        out = []
        for k in indices:
            c = captions[int(k)]
            figure = attention_figure(c.image, c.words, c.attention.numpy(), spec.grid, preprocessing.input_size)
            figures.append(figure)
            out.append({"image": c.image, "caption": c.caption, "references": refs[c.image], "figure": figure,
                        "cider": float(per_image["cider"][k]), "bleu4": float(per_image["bleu4"][k])})
        return out

    groups = [("Best captions (highest CIDEr-D)", entries(order[:SHOWN])),
              ("Worst captions (lowest CIDEr-D)", entries(order[::-1][:SHOWN])),
              ("Examples (seeded draw)", entries(examples))]
    curve = _curve(run_dir)
    try:
        return render_page("caption.html", path, title=f"Captions: {run_dir.name} ({result['split']})",
                           result=result, metric_order=METRIC_ORDER, groups=groups, curve=curve, spec=spec,
                           grid_note="one cell: pooled features have no layout to attend over"
                           if spec.grid == (1, 1) else f"{spec.grid[0]} x {spec.grid[1]} cells")
    finally:
        for figure in [*figures, curve]:
            if figure is not None:
                plt.close(figure)
