"""How often a fleet's agents beat: the coordinator's heartbeat budget, spread.

The watch calls `period` once a sweep with the number of live agents. Agents are told
the period (a signed Ping carrying `heartbeat_interval`) when they say hello, all of
them when it changes, and any whose heartbeat says another one; every heartbeat says
the period its agent beats at, by which the coordinator judges it lost.

A small fleet beats every `heartbeat_interval`. A fleet of more than
`rate x heartbeat_interval` agents would send more than `rate` heartbeats a second
(1,000 a second at 2,000 agents and 2 s: a fifth of a core for signature checks
alone), so its period grows with it, as Nomad sizes its heartbeat TTLs
(`max_heartbeats_per_second`): to `heartbeat_interval` times the smallest power of two
that keeps the fleet within `rate`. Powers of two, because every change is told to
every agent: a fleet growing from nothing to 2,000 agents is told three times, not
ten. The period grows at once and shrinks only with a margin (`SHRINK`), so a fleet
whose size wavers around a step is not told a new period on every sweep. Pure.
"""

from __future__ import annotations

SHRINK = 0.75
"""A shorter period is told only if the fleet then sends at most this share of `rate`."""


def period(agents: int, base: float, rate: float, current: float) -> float:
    """The period (seconds) a fleet of `agents` should beat at, now beating at `current`,
    given the coordinator's `base` period and `rate`, the most heartbeats a second."""
    needed = _step(agents / rate, base)
    if needed >= current:
        return needed
    return min(current, _step(agents / (SHRINK * rate), base))


def _step(seconds: float, base: float) -> float:
    """The least `base` x 2**k (k >= 0) that is at least `seconds`."""
    step = base
    while step < seconds:
        step *= 2
    return step
