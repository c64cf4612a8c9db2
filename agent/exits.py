"""Counting unexpected exits of services: what makes a crash loop (SPEC 6.2).

Pure bookkeeping for the supervisor's crash handling: `ExitHistory.record` notes one
unexpected exit of a service and says how many fell within the window; the supervisor
restarts the service after `backoff(exits)` seconds until `is_loop` says the limit is
reached. A deliberate stop (a step switching or stopping the service) clears the
service's history: a new release, or the same one started on purpose, starts afresh.
"""

from __future__ import annotations

from collections import deque

BACKOFF_FIRST = 0.5
"""Seconds before the first restart; doubled for every further exit in the window."""
BACKOFF_MAX = 10.0


def backoff(exits: int) -> float:
    """Seconds to wait before restarting a service that exited `exits` times."""
    return float(min(BACKOFF_FIRST * 2 ** max(exits - 1, 0), BACKOFF_MAX))


class ExitHistory:
    """Unexpected exits per service within a sliding window."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._exits: dict[str, deque[float]] = {}

    def record(self, service: str, now: float) -> int:
        """Note an exit of `service` at `now` (monotonic seconds); exits in the window."""
        exits = self._exits.setdefault(service, deque())
        exits.append(now)
        while exits and exits[0] < now - self.window:
            exits.popleft()
        return len(exits)

    def is_loop(self, exits: int) -> bool:
        """Whether `exits` exits within the window make a crash loop."""
        return exits >= self.limit

    def clear(self, service: str) -> None:
        self._exits.pop(service, None)
