"""Prepare waves: how `max_parallel_prepare` paces the prepares (pure; for the machine).

Prepare flow control (`max_parallel_prepare`, default all): at most that many
participants have a prepare in flight. They go out in plan order (the commit batches
in turn); the rest wait `queued`, and each YES vote, or a silent participant written
off as unavailable, lets the next one go. The prepare timeout runs per wave: wave w is
the w-th run of `max_parallel_prepare` participants in plan order, and its timer
(`prepare` for wave 0, `prepare:<w>` after) starts once its last member is sent its
prepare. When it fires, the members of that wave still silent are late: beyond
`allow_unavailable` hosts (counted over the whole deployment) that aborts, otherwise
they are left out as unavailable and their slots go to the next ones. So every
participant gets at least `prepare_timeout` to vote, however long the queue before it,
and a phase with every prepare in flight at once keeps its one `prepare` timer.
"""

from __future__ import annotations

from coordinator.deployment import Action, Deployment, StartTimer


def timers(d: Deployment, start: int, end: int) -> list[Action]:
    """The timers of the waves whose last member is among plan positions [start, end)."""
    total = sum(len(step) for step in d.steps)
    size = d.strategy.prepare_size(total)
    timers: list[Action] = []
    for wave in range(start // size, (end - 1) // size + 1):
        if start < min((wave + 1) * size, total) <= end:
            timers.append(StartTimer(token(wave), d.strategy.prepare_timeout))
    return timers


def token(wave: int) -> str:
    return "prepare" if wave == 0 else f"prepare:{wave}"


def wave_of(token: str) -> int | None:
    """The wave a prepare timer's token names, or None if it is no prepare timer."""
    if token == "prepare":
        return 0
    name, _, wave = token.partition(":")
    return int(wave) if name == "prepare" and wave.isdigit() else None
