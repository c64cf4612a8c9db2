"""Semver versions and `requires` constraints ("comma-separated semver comparisons").

A constraint such as ">=1.5.0, <2.0.0" holds when every comparison holds. Used by the
spec models to validate files and by the coordinator's resolver and planner.
"""

from __future__ import annotations

import re

import semver

_COMPARISON = re.compile(r"^(>=|<=|==|!=|>|<|=)?\s*(\S+)$")


def parse_version(text: str) -> semver.Version:
    """The semver version in `text`; ValueError naming the text if it is not one."""
    try:
        return semver.Version.parse(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{text!r} is not a semver version (like 2.1.0)") from e


def parse_constraint(text: str) -> list[tuple[str, semver.Version]]:
    """The comparisons in `text`, each as (operator, version)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"{text!r} is not a constraint such as '>=1.5.0, <2.0.0'")
    comparisons = []
    for part in parts:
        match = _COMPARISON.match(part)
        if not match:
            raise ValueError(f"{part!r} in {text!r} is not a semver comparison")
        op = match.group(1) or "=="
        comparisons.append(("==" if op == "=" else op, parse_version(match.group(2))))
    return comparisons


_OPS = {
    ">=": lambda c: c >= 0,
    "<=": lambda c: c <= 0,
    ">": lambda c: c > 0,
    "<": lambda c: c < 0,
    "==": lambda c: c == 0,
    "!=": lambda c: c != 0,
}


def satisfies(version: str, constraint: str) -> bool:
    """Whether `version` meets every comparison in `constraint`."""
    v = parse_version(version)
    return all(_OPS[op](v.compare(bound)) for op, bound in parse_constraint(constraint))
