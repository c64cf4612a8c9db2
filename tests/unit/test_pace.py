"""Issue 9 "liveness off the critical path" at 2,000 agents: the heartbeat period a
fleet is told (coordinator.pace), table-tested. A small fleet beats every
heartbeat_interval; a large one no more than `rate` times a second in all."""

from __future__ import annotations

import pytest

from coordinator import pace


@pytest.mark.parametrize(
    ("agents", "current", "expected"),
    [
        (0, 2.0, 2.0),  # no fleet: the base period
        (200, 2.0, 2.0),  # 200 agents x 1 per 2 s = 100 a second: within the budget
        (201, 2.0, 4.0),  # one more: the next whole step of the base period
        (1000, 2.0, 10.0),  # 1,000 agents: 100 a second at 10 s
        (2000, 2.0, 20.0),  # 2,000 agents: 100 a second at 20 s
        (2001, 20.0, 22.0),  # grows at once
        (1600, 20.0, 20.0),  # shrank by a fifth: kept (no new period on every wobble)
        (1200, 20.0, 16.0),  # shrank more: 75 a second at 16 s, so told the shorter period
        (100, 20.0, 2.0),  # back to a small fleet: the base period again
    ],
)
def test_the_period_grows_with_the_fleet_so_it_sends_at_most_rate_heartbeats_a_second(
    agents: int, current: float, expected: float
) -> None:
    told = pace.period(agents, base=2.0, rate=100.0, current=current)
    assert told == expected
    assert agents / told <= 100.0 or told == current  # the budget holds unless kept


def test_a_fleet_wavering_around_a_step_is_not_told_a_new_period_each_sweep() -> None:
    current = 2.0
    told = []
    for agents in [199, 201, 199, 201, 180, 201, 199]:
        current = pace.period(agents, base=2.0, rate=100.0, current=current)
        told.append(current)
    assert told == [2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
