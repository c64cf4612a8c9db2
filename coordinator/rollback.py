"""Where a rollback goes (SPEC 6.3): the last good release, and the smallest move.

Pure functions the coordinator loop calls for `lockstep rollback` and for automatic
rollbacks: `last_good` picks the release to return to (never one marked bad), and
`dependents_target` moves the named services back plus the fewest others needed so
that every `requires` holds again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

from coordinator.records import Release
from coordinator.resolver import Catalog, check
from shared.errors import UserError

EXACT_LIMIT = 14
"""Beyond this many candidate services, a partial rollback moves all of them."""


def last_good(releases: Sequence[Release], current_id: int | None) -> Release | None:
    """The newest good release older than the current one (releases newest first)."""
    for release in releases:
        if release.state == "good" and current_id is not None and release.id < current_id:
            return release
    return None


def named(releases: Sequence[Release], release_id: int, force: bool) -> Release:
    """Release `release_id` as a rollback target; a bad one only with `force`."""
    for release in releases:
        if release.id == release_id:
            if release.state == "bad" and not force:
                raise UserError(
                    "--to",
                    f"release {release_id} is marked bad (it was rolled back); "
                    "use --force to deploy it anyway",
                )
            if release.state == "pending":
                raise UserError("--to", f"release {release_id} is still being deployed")
            return release
    raise UserError("--to", f"there is no release {release_id}")


def dependents_target(
    current: Mapping[str, str],
    previous: Mapping[str, str],
    services: Sequence[str],
    catalog: Catalog,
) -> dict[str, str]:
    """`current` with `services` back at `previous`, plus the fewest others that must move."""
    for name in services:
        if name not in previous:
            raise UserError("--service", f"{name} is not in the release to roll back to")
    base = {**current, **{name: previous[name] for name in services}}
    others = sorted(s for s in previous if s not in services and current.get(s) != previous[s])
    if len(others) > EXACT_LIMIT:
        return {**current, **previous}
    for size in range(len(others) + 1):
        for extra in combinations(others, size):
            target = {**base, **{name: previous[name] for name in extra}}
            if not check(target, catalog):
                return target
    raise UserError("--service", "no consistent version set moves these services back")
