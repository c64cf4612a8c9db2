"""The resolver: turns "current release + requested versions" into a checked version set.

Pure (no I/O, no await). The coordinator loop calls `resolve` before it plans a
deployment and the CLI calls it for `lockstep plan`; the planner calls `check` on every
intermediate version set of a rollout (SPEC 6.1, step 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from shared.errors import UserError
from shared.specs import ServiceVersion
from shared.versions import satisfies

Catalog = Mapping[tuple[str, str], ServiceVersion]
"""Every registered service version, keyed by (name, version)."""


@dataclass(frozen=True)
class Violation:
    """One `requires` entry of a member of a version set that the set does not meet."""

    service: str
    version: str
    requires: str
    constraint: str
    found: str | None

    def describe(self) -> str:
        """The violation in words: the service, its constraint and what breaks it."""
        head = f"{self.service} {self.version} requires {self.requires} {self.constraint}"
        if self.found is None:
            return f"{head} but {self.requires} is not in the set"
        return f"{head} but the set has {self.requires} {self.found}"


def spec_of(name: str, version: str, catalog: Catalog) -> ServiceVersion:
    """The registered spec of `name` `version`, or `UserError` if it is not registered."""
    spec = catalog.get((name, version))
    if spec is None:
        raise UserError(f"services.{name}", f"version {version} is not registered")
    return spec


@lru_cache(maxsize=4096)
def _holds(version: str, constraint: str) -> bool:
    """`satisfies`, remembered: the planner checks the same pairs many times."""
    return satisfies(version, constraint)


def check(version_set: Mapping[str, str], catalog: Catalog) -> list[Violation]:
    """Every `requires` of every member of `version_set` that the set breaks, sorted."""
    violations = []
    for name in sorted(version_set):
        spec = spec_of(name, version_set[name], catalog)
        for dep in sorted(spec.requires):
            found = version_set.get(dep)
            if found is None or not _holds(found, spec.requires[dep]):
                violations.append(
                    Violation(name, spec.version, dep, spec.requires[dep], found),
                )
    return violations


def resolve(
    current: Mapping[str, str], requested: Mapping[str, str], catalog: Catalog
) -> dict[str, str]:
    """The full target set: `current` updated with `requested`, checked against `catalog`.

    Raises `UserError` for a version that is not registered, or naming the first
    violated `requires` (service, constraint and the version that breaks it).
    """
    target = {**current, **requested}
    for name in sorted(target):
        spec_of(name, target[name], catalog)
    violations = check(target, catalog)
    if violations:
        first = violations[0]
        raise UserError(f"services.{first.service}", first.describe())
    return dict(sorted(target.items()))
