"""Per-epoch metrics as CSV and as loss / accuracy curves."""

from __future__ import annotations

import csv
from pathlib import Path

from visiontune.io import atomic_write


def write_metrics_csv(history: list[dict], path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def plot_history(history: list[dict], path: Path, freeze_epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]  # epoch 0: the linear probe
    probed = int(any(row["stage"] == "probe" for row in history))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="val")
    ax_acc.plot(epochs, [r["val_f1_macro"] for r in history], "s--", label="val macro-F1")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if 0 < freeze_epochs + probed < len(history):
            ax.axvline(freeze_epochs + 0.5, color="grey", linestyle=":", label="unfrozen")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
