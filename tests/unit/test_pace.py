"""Issue 9 "liveness off the critical path" at 2,000 agents: the heartbeat period a
fleet is told (coordinator.pace), table-tested. A small fleet beats every
heartbeat_interval; a large one no more than `rate` times a second in all, in
power-of-two steps of it."""

from __future__ import annotations

import pytest

from coordinator import pace


@pytest.mark.parametrize(
    ("agents", "current", "expected"),
    [
        (0, 2.0, 2.0),  # no fleet: the base period
        (300, 2.0, 2.0),  # 300 agents x 1 per 2 s = 150 a second: within the budget
        (301, 2.0, 4.0),  # one more: twice the period
        (1000, 2.0, 8.0),  # 1,000 agents: 125 a second at 8 s
        (2000, 2.0, 16.0),  # 2,000 agents: 125 a second at 16 s
        (2401, 16.0, 32.0),  # grows at once
        (1700, 16.0, 16.0),  # shrank: at 8 s it would send 212 a second, over the budget
        (1000, 16.0, 16.0),  # 125 a second at 8 s: over 75% of the budget, kept
        (900, 16.0, 8.0),  # 112 a second at 8 s: told the shorter period
        (100, 16.0, 2.0),  # back to a small fleet: the base period again
    ],
)
def test_the_period_grows_with_the_fleet_so_it_sends_at_most_rate_heartbeats_a_second(
    agents: int, current: float, expected: float
) -> None:
    told = pace.period(agents, base=2.0, rate=150.0, current=current)
    assert told == expected
    assert agents / told <= 150.0


def test_a_fleet_growing_to_2000_is_told_a_new_period_three_times() -> None:
    current, told = 2.0, []
    for agents in range(0, 2001, 10):
        new = pace.period(agents, base=2.0, rate=150.0, current=current)
        if new != current:
            told.append(new)
        current = new
    assert told == [4.0, 8.0, 16.0]  # three changes from the base: 300, 600, 1,200 agents


def test_a_fleet_wavering_around_a_step_is_not_told_a_new_period_each_sweep() -> None:
    current = 2.0
    told = []
    for agents in [299, 301, 299, 301, 250, 301, 299]:
        current = pace.period(agents, base=2.0, rate=150.0, current=current)
        told.append(current)
    assert told == [2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
