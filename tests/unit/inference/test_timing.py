"""The timer: warm-up calls are not timed, the median of the timed repeats is reported."""

from __future__ import annotations

import pytest

from visiontune.inference.timing import time_call


class FakeWork:
    """Each call advances a fake clock by the next duration; the clock only moves when work runs."""

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.calls = list(durations), 0.0, 0

    def clock(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.now += self.durations[self.calls]
        self.calls += 1


def test_warmup_is_not_timed_and_the_median_is_reported():
    work = FakeWork([100.0, 50.0, 3.0, 1.0, 2.0, 9.0, 4.0])  # two slow warm-up calls, then 5 repeats
    timing = time_call(work, warmup=2, repeats=5, clock=work.clock)
    assert work.calls == 7
    assert timing.repeats == [3.0, 1.0, 2.0, 9.0, 4.0]
    assert timing.median == 3.0
    assert timing.spread == pytest.approx((9.0 - 1.0) / 3.0)


def test_even_number_of_repeats_takes_the_middle_mean():
    work = FakeWork([2.0, 4.0, 6.0, 100.0])
    assert time_call(work, warmup=0, repeats=4, clock=work.clock).median == 5.0


def test_at_least_one_repeat():
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=0)
