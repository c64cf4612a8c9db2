"""Durations as users write them in TOML files and flags ("500ms", "2s", "5m", "1h").

Every `Duration` field of the specs and settings goes through `parse_duration`, which
also bounds it: nothing lockstep waits for is sane past `MAX_SECONDS` (7 days), and a
NaN or infinite float would make every comparison against it meaningless.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
MAX_SECONDS = 7 * 24 * 3600
"""The longest duration accepted anywhere (7 days)."""


def parse_duration(value: object) -> float:
    """Seconds for `value`: a number of seconds or a string such as "0.5s" or "2m"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '2s' or '500ms'")
    if isinstance(value, int | float):
        return _bounded(float(value))
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return _bounded(float(match.group(1)) * _UNITS[match.group(2) or "s"])
    raise ValueError(f"{value!r} is not a duration such as '2s', '500ms' or '1m'")


def _bounded(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{seconds:g}s is longer than the limit of {MAX_SECONDS}s (7 days)")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, accepting "2s"/"500ms"/"1m" strings as input."""
