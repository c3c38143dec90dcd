"""Learning-rate schedules as pure functions of the step within a stage.

Each stage (frozen, then unfrozen) runs its own schedule, as in fastai's `fine_tune`. The learning
rate is recomputed from (stage, step) on every step, so resuming needs only the step counter.
"""

from __future__ import annotations

import math

ONE_CYCLE_DIV = 25.0  # start at peak / 25
ONE_CYCLE_FINAL_DIV = 1e4  # end at start / 1e4
DEFAULT_PCT_START = {"flat_cos": 0.75, "one_cycle": 0.25, "cosine": 0.0}


def lr_factor(
    schedule: str,
    step: int,
    total_steps: int,
    pct_start: float | None = None,
    warmup_fraction: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total_steps`.

    - flat_cos: flat until `pct_start` (default 0.75), then cosine to zero;
    - one_cycle: cosine warm-up from peak/25 over `pct_start` (default 0.25), then cosine down;
    - cosine: cosine from the peak to zero.
    `warmup_fraction` adds a linear warm-up to flat_cos and cosine (used after unfreezing, so the
    first unfrozen steps cannot wreck the pretrained features).
    """
    if schedule not in DEFAULT_PCT_START:
        raise ValueError(f"unknown schedule {schedule!r}")
    total_steps = max(total_steps, 1)
    progress = step / total_steps
    pct = DEFAULT_PCT_START[schedule] if pct_start is None else pct_start
    if schedule == "one_cycle":
        start, end = 1.0 / ONE_CYCLE_DIV, 1.0 / (ONE_CYCLE_DIV * ONE_CYCLE_FINAL_DIV)
        if progress < pct:
            return _cos_between(start, 1.0, progress / pct)
        return _cos_between(1.0, end, (progress - pct) / (1 - pct))
    factor = 1.0
    if schedule == "flat_cos" and progress >= pct:
        factor = _cos_between(1.0, 0.0, (progress - pct) / (1 - pct))
    elif schedule == "cosine":
        factor = _cos_between(1.0, 0.0, progress)
    warmup_steps = math.ceil(warmup_fraction * total_steps)
    if step < warmup_steps:
        factor *= (step + 1) / (warmup_steps + 1)
    return factor


def _cos_between(start: float, end: float, t: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0))) / 2
