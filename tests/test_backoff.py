"""The one backoff helper behind every retry loop."""

from __future__ import annotations

import pytest

from sqapi.backoff import exponential
from sqapi.core.outcome import RetryPolicy


def test_delays_grow_by_the_multiplier_up_to_the_cap() -> None:
    assert [exponential(n, 0.5, 30.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [exponential(n, 1.0, 100.0, multiplier=3) for n in (1, 2, 3)] == [1, 3, 9]
    assert exponential(0, 2.0, 10.0) == 2.0  # an attempt below 1 is the first


@pytest.mark.parametrize("attempt", [10 ** 3, 10 ** 6, 10 ** 30])
def test_any_attempt_number_gives_the_cap_instead_of_overflowing(attempt: int) -> None:
    assert exponential(attempt, 1.0, 300.0) == 300.0
    assert RetryPolicy().delay_for(attempt) == RetryPolicy().max_delay


def test_jitter_stays_between_half_and_all_of_the_delay() -> None:
    delays = [exponential(4, 1.0, 60.0, jitter=True) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays) and len(set(delays)) > 100
