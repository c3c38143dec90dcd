"""Early stopping that also tracks the best epoch, with state that survives a resume.

Accuracy and F1 on a small validation set tie often; a tie is then broken by the lower
validation loss, so "best" is never just the first of several equal epochs.
"""

from __future__ import annotations

import math

MODES = {"val_loss": "min", "val_accuracy": "max", "val_f1_macro": "max"}


class EarlyStopping:
    def __init__(self, monitor: str = "val_loss", patience: int | None = None, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = MODES[monitor]
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, value: float, loss: float | None = None) -> bool:
        """Record `value` (and the val loss, for ties) for `epoch`; True when it is a new best.

        Only a strict improvement resets the patience; a tie won on loss is kept as the best
        checkpoint but still counts as an epoch without progress.
        """
        if self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        tie_won = (
            not improved and value == self.best and loss is not None and loss < self.best_loss
        )
        if improved or tie_won:
            self.best, self.best_epoch = value, epoch
            self.best_loss = loss if loss is not None else math.inf
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return improved or tie_won

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "best": self.best, "best_loss": self.best_loss,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.best_loss = state["best_loss"]
