"""What a host should run, what it runs instead, and which deployments may run at once.

Pure functions for the coordinator's watch loop and request intake:
- `desired` is the current release restricted to the services whose `hosts` selector
  matches a host's labels; `drift` compares it with what the host reports.
- `groups` gathers the hosts that need the same change (from the same versions) so
  each group converges as ONE deployment, in batches: a rack of returning hosts moves
  together, not one host at a time.
- `locks` is the set of services a deployment holds: the services it changes plus every
  service they require or that requires them, so two deployments whose lock sets are
  disjoint can neither break each other's `requires` nor lose each other's changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from coordinator.planner import selects
from coordinator.resolver import Catalog


@dataclass(frozen=True)
class Drift:
    fix: dict[str, str] = field(default_factory=dict)
    """service -> version the host must be moved to."""
    unknown: dict[str, str] = field(default_factory=dict)
    """service -> version the host runs that lockstep never deployed (left alone)."""


def desired(
    labels: Mapping[str, str], release: Mapping[str, str], catalog: Catalog
) -> dict[str, str]:
    """The services of `release` that should run on a host with `labels`."""
    return {
        name: version
        for name, version in release.items()
        if (name, version) in catalog and selects(catalog[(name, version)].hosts, labels)
    }


def drift(
    want: Mapping[str, str],
    running: Mapping[str, str | None],
    deployed: Iterable[tuple[str, str]],
    overwrite: bool = False,
) -> Drift:
    """How `running` differs from `want`; versions never deployed are only fixed if `overwrite`."""
    known = set(deployed)
    result = Drift()
    for name, version in sorted(want.items()):
        has = running.get(name)
        if has == version:
            continue
        if has is not None and (name, has) not in known and not overwrite:
            result.unknown[name] = has
        else:
            result.fix[name] = version
    return result


@dataclass(frozen=True)
class Group:
    """Hosts that need the same change from the same versions: one deployment."""

    fix: dict[str, str]
    """service -> the version every host of the group must be moved to."""
    running: dict[str, str | None]
    """service (of `fix`) -> the version the hosts run now (None: not installed)."""
    hosts: tuple[str, ...]


def groups(
    fixes: Mapping[str, Mapping[str, str]], running: Mapping[str, Mapping[str, str | None]]
) -> list[Group]:
    """The hosts of `fixes` (host -> its `Drift.fix`) gathered by what they must change
    and what they run of it now (`running`: host -> service -> version), in host order."""
    found: dict[tuple[tuple[str, str], ...], Group] = {}
    for host in sorted(fixes):
        fix = dict(sorted(fixes[host].items()))
        if not fix:
            continue
        now = {name: running.get(host, {}).get(name) for name in fix}
        key = (*fix.items(), *((name, str(v)) for name, v in now.items()))
        group = found.get(key)
        found[key] = Group(fix, now, (*group.hosts, host) if group else (host,))
    return sorted(found.values(), key=lambda g: g.hosts[0])


def locks(changed: Iterable[str], target: Mapping[str, str], catalog: Catalog) -> set[str]:
    """`changed` plus every service of `target` one `requires` away from one of them."""
    moving = set(changed)
    held = set(moving)
    for name, version in target.items():
        spec = catalog.get((name, version))
        if spec is None:
            continue
        if name in moving:
            held |= set(spec.requires)
        if moving & set(spec.requires):
            held.add(name)
    return held
