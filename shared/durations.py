"""Durations as users write them in TOML files and flags ("500ms", "2s", "5m", "1h")."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object) -> float:
    """Seconds for `value`: a number of seconds or a string such as "0.5s" or "2m"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '2s' or '500ms'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration such as '2s', '500ms' or '1m'")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, accepting "2s"/"500ms"/"1m" strings as input."""
