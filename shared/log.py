"""structlog setup: JSON lines, or a pretty console when stderr is a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def setup(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog for a lockstep process (logs go to stderr)."""
    name = (level or os.environ.get("LOCKSTEP_LOG_LEVEL", "info")).upper()
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[name]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str, **context: Any) -> Any:
    """A logger bound with `component=name` and `context`."""
    return structlog.get_logger(component=name, **context)
