"""lr_factor: the shape of each schedule, warm-up, and errors."""

from __future__ import annotations

import math

import pytest

from visiontune.training.schedules import ONE_CYCLE_DIV, lr_factor

TOTAL = 200


def curve(schedule: str, total: int = TOTAL, **kwargs) -> list[float]:
    return [lr_factor(schedule, step, total, **kwargs) for step in range(total)]


def assert_non_increasing(values: list[float]) -> None:
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_flat_cos_is_flat_until_75_percent_then_decays_to_zero():
    values = curve("flat_cos")
    flat_until = int(0.75 * TOTAL)
    assert values[:flat_until + 1] == [1.0] * (flat_until + 1)  # step 150 is exactly the start
    assert values[flat_until + 1] < 1.0
    assert values[-1] < 1e-3
    assert lr_factor("flat_cos", 175, TOTAL) == pytest.approx(0.5)  # halfway down the cosine
    assert_non_increasing(values)


def test_flat_cos_respects_pct_start():
    values = curve("flat_cos", pct_start=0.5)
    assert values[100] == 1.0 and values[101] < 1.0
    assert values[150] == pytest.approx(0.5)


def test_one_cycle_warms_up_to_peak_then_anneals():
    values = curve("one_cycle")
    peak = int(0.25 * TOTAL)
    assert values[0] == pytest.approx(1 / ONE_CYCLE_DIV) == pytest.approx(0.04)
    assert values[peak] == pytest.approx(1.0) and max(values) == values[peak]
    assert all(b > a for a, b in zip(values[:peak], values[1:peak + 1]))
    assert_non_increasing(values[peak:])
    assert values[-1] < 1e-3


def test_one_cycle_peak_follows_pct_start():
    values = curve("one_cycle", pct_start=0.5)
    assert values.index(max(values)) == 100 and values[100] == pytest.approx(1.0)


def test_cosine_starts_at_one_and_is_half_at_midpoint():
    values = curve("cosine")
    assert values[0] == 1.0
    assert values[TOTAL // 2] == pytest.approx(0.5)
    assert values[TOTAL // 4] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert values[-1] < 1e-3
    assert_non_increasing(values)


@pytest.mark.parametrize("schedule", ["flat_cos", "cosine"])
def test_warmup_ramps_linearly_then_joins_the_schedule(schedule):
    plain = curve(schedule, total=100)
    warmed = curve(schedule, total=100, warmup_fraction=0.1)
    ratios = [w / p for w, p in zip(warmed[:10], plain[:10])]
    assert ratios == pytest.approx([(s + 1) / 11 for s in range(10)])  # linear ramp to the schedule
    assert ratios[0] < 0.1
    assert warmed[10:] == plain[10:]


def test_warmup_of_flat_cos_is_exactly_linear():
    warmed = curve("flat_cos", total=50, warmup_fraction=0.2)
    steps = [b - a for a, b in zip(warmed[:10], warmed[1:11])]
    assert steps == pytest.approx([1 / 11] * 10)
    assert warmed[10] == 1.0


def test_factor_stays_in_unit_interval_for_every_schedule():
    for schedule in ("flat_cos", "one_cycle", "cosine"):
        assert all(0.0 <= v <= 1.0 for v in curve(schedule, total=37, warmup_fraction=0.3))


def test_zero_total_steps_does_not_divide_by_zero():
    assert lr_factor("cosine", 0, 0) == 1.0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor("linear", 0, 10)
