"""How a report writes numbers: fixed decimals, significant digits, percentages and intervals,
with a missing value (None, NaN, an empty cell) always shown as one em dash, never "nan" or "None"."""

from __future__ import annotations

import math
from collections.abc import Sequence

MISSING = "\u2014"  # em dash


def is_missing(value: object) -> bool:
    if value is None or value == "":
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fixed(value: object, digits: int = 4) -> str:
    """0.87654 -> "0.8765"."""
    if is_missing(value):
        return MISSING
    return f"{float(value):.{digits}f}"


def significant(value: object, digits: int = 4) -> str:
    """Numbers (also numeric text) to `digits` significant digits, lists joined, other text as is."""
    if isinstance(value, (list, tuple)):
        return ", ".join(significant(v, digits) for v in value)
    if is_missing(value):
        return MISSING
    try:
        return f"{float(value):.{digits}g}"  # CSV cells arrive as text
    except (TypeError, ValueError):
        return str(value)


def percent(value: object, digits: int = 1) -> str:
    """0.1234 -> "12.3%"."""
    if is_missing(value):
        return MISSING
    return f"{100 * float(value):.{digits}f}%"


def interval(pair: Sequence[float] | None, digits: int = 4) -> str:
    """A (low, high) confidence interval -> "0.8123 – 0.9321" (en dash)."""
    if pair is None or len(pair) != 2 or any(is_missing(v) for v in pair):
        return MISSING
    return f"{fixed(pair[0], digits)} \u2013 {fixed(pair[1], digits)}"


def cell(value: object, digits: int = 4) -> str:
    """A table value of mixed kinds: floats to `digits` decimals, counts and text as they are."""
    if is_missing(value):
        return MISSING
    if isinstance(value, float):
        return fixed(value, digits)
    return str(value)
