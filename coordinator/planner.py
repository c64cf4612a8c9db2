"""The planner: turns a checked target version set into waves of batches of participants.

Pure (no I/O, no await). The coordinator loop calls `plan` after `resolver.resolve` to
know who prepares and in which order commits go out; `lockstep plan --json` prints
`Plan.to_dict()`. SPEC 6.1 step 1: waves follow the dependency graph (providers before
consumers), the fleet's version set after every wave satisfies every `requires`, and
when no order does, the changed services switch together in one synchronized wave.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from coordinator.deployment import Participant
from coordinator.resolver import Catalog, check, spec_of
from shared.errors import UserError
from shared.specs import Strategy

EXACT_SEARCH_LIMIT = 16
"""Beyond this many changed services only the preferred order is tried."""


@dataclass(frozen=True)
class AgentInfo:
    """What the planner needs to know of one agent."""

    host_id: str
    labels: Mapping[str, str]
    alive: bool = True


@dataclass(frozen=True)
class Wave:
    """Services that switch together, their hosts in batches, and the set afterwards."""

    services: tuple[str, ...]
    batches: tuple[tuple[Participant, ...], ...]
    synchronized: bool
    state_after: Mapping[str, str]


@dataclass(frozen=True)
class Plan:
    """A deployment's rollout: waves in order, and each changed service's rank."""

    current: Mapping[str, str]
    target: Mapping[str, str]
    changed: tuple[str, ...]
    waves: tuple[Wave, ...]
    rank: Mapping[str, int]

    def participants(self) -> list[Participant]:
        """Every participant, in commit order."""
        return [p for wave in self.waves for batch in wave.batches for p in batch]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view, for `lockstep plan --json`."""
        return {
            "current": dict(self.current),
            "target": dict(self.target),
            "changed": list(self.changed),
            "rank": dict(self.rank),
            "waves": [_wave_dict(wave) for wave in self.waves],
        }


def _wave_dict(wave: Wave) -> dict[str, Any]:
    return {
        "services": list(wave.services),
        "synchronized": wave.synchronized,
        "state_after": dict(wave.state_after),
        "batches": [[_participant_dict(p) for p in batch] for batch in wave.batches],
    }


def _participant_dict(p: Participant) -> dict[str, Any]:
    return {"host": p.host, "service": p.service, "version": p.version,
            "from_version": p.from_version}  # fmt: skip


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether an agent with `labels` matches `selector` (empty selects every host)."""
    return all(labels.get(key) == value for key, value in selector.items())


def plan(
    current: Mapping[str, str],
    target: Mapping[str, str],
    catalog: Catalog,
    agents: Sequence[AgentInfo],
    strategy: Strategy,
    running: Mapping[str, Mapping[str, str]] | None = None,
    *,
    consumers_first: bool = False,
) -> Plan:
    """The rollout from `current` to `target` over the live `agents`.

    `consumers_first` (rollbacks) prefers moving consumers before providers where
    both orders keep every intermediate set valid.

    `running` maps host id to the versions it reports; a host listed there takes its
    `from_version` from it (None if it does not run the service), any other host from
    `current`. Raises `UserError` if `target` breaks a `requires` or a changed service's
    selector matches no live agent.
    """
    violations = check(target, catalog)
    if violations:
        raise UserError(f"services.{violations[0].service}", violations[0].describe())
    changed = tuple(sorted(s for s in target if current.get(s) != target[s]))
    hosts = {s: _hosts_of(s, target[s], catalog, agents) for s in changed}
    rank = ranks(changed, target, catalog)
    preferred = sorted(changed, key=lambda s: (-rank[s] if consumers_first else rank[s], s))
    groups, synchronized = _wave_groups(preferred, current, target, catalog)
    waves: list[Wave] = []
    switched: set[str] = set()
    for index, group in enumerate(groups):
        switched.update(group)
        canary = strategy.canary if index == 0 else 0
        waves.append(
            Wave(
                services=group,
                batches=_batches(group, hosts, target, current, running, strategy, canary),
                synchronized=synchronized,
                state_after=_state(current, target, frozenset(switched)),
            )
        )
    return Plan(
        current=dict(sorted(current.items())),
        target=dict(sorted(target.items())),
        changed=changed,
        waves=tuple(waves),
        rank=rank,
    )


def _hosts_of(
    service: str, version: str, catalog: Catalog, agents: Sequence[AgentInfo]
) -> list[str]:
    selector = spec_of(service, version, catalog).hosts
    found = sorted(a.host_id for a in agents if a.alive and selects(selector, a.labels))
    if not found:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(every host)"
        raise UserError(f"services.{service}.hosts", f"selector {shown} matches no live agent")
    return found


def ranks(changed: Sequence[str], target: Mapping[str, str], catalog: Catalog) -> dict[str, int]:
    """Dependency depth of each changed service over the target versions' `requires`.

    Providers rank lower than their consumers; services in a `requires` cycle share
    a rank. Rollbacks revert higher ranks first (consumers before providers).
    """
    members = set(changed)
    edges = {
        s: {d for d in spec_of(s, target[s], catalog).requires if d in members} for s in changed
    }
    reach = {s: _reachable(s, edges) for s in changed}
    component = {s: frozenset({s} | {t for t in reach[s] if s in reach[t]}) for s in changed}

    @cache
    def depth(comp: frozenset[str]) -> int:
        below = {component[d] for s in comp for d in edges[s]} - {comp}
        return 1 + max(map(depth, below)) if below else 0

    return {s: depth(component[s]) for s in changed}


def _reachable(start: str, edges: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(edges[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(edges[node])
    return seen


def _state(
    current: Mapping[str, str], target: Mapping[str, str], switched: frozenset[str]
) -> dict[str, str]:
    """The fleet's set once `switched` moved: target for those and unchanged services."""
    state = {s: v for s, v in target.items() if s in switched or current.get(s) == v}
    state.update({s: current[s] for s in target if s not in state and s in current})
    return dict(sorted(state.items()))


def _wave_groups(
    preferred: list[str],
    current: Mapping[str, str],
    target: Mapping[str, str],
    catalog: Catalog,
) -> tuple[list[tuple[str, ...]], bool]:
    """One service per wave in an order keeping every set valid, else all together.

    `preferred` is the order to try first. The flag says whether the waves are one
    synchronized wave.
    """
    order = _search(preferred, current, target, catalog)
    if order is None:
        return [tuple(sorted(preferred))], True
    return [(s,) for s in order], False


def _search(
    preferred: list[str], current: Mapping[str, str], target: Mapping[str, str], catalog: Catalog
) -> list[str] | None:
    """A switching order whose every intermediate set is valid, or None.

    Depth-first over the sets already switched, trying `preferred` order first and
    remembering dead ends; past `EXACT_SEARCH_LIMIT` services only `preferred` is tried.
    """

    def valid(switched: frozenset[str]) -> bool:
        return not check(_state(current, target, switched), catalog)

    if len(preferred) > EXACT_SEARCH_LIMIT:
        done = [frozenset(preferred[: i + 1]) for i in range(len(preferred))]
        return preferred if all(map(valid, done)) else None
    dead: set[frozenset[str]] = set()

    def extend(switched: frozenset[str]) -> list[str] | None:
        if len(switched) == len(preferred):
            return []
        for service in (s for s in preferred if s not in switched):
            after = switched | {service}
            if after in dead:
                continue
            rest = extend(after) if valid(after) else None
            if rest is not None:
                return [service, *rest]
            dead.add(after)
        return None

    return extend(frozenset())


def _batches(
    services: tuple[str, ...],
    hosts: Mapping[str, list[str]],
    target: Mapping[str, str],
    current: Mapping[str, str],
    running: Mapping[str, Mapping[str, str]] | None,
    strategy: Strategy,
    canary: int,
) -> tuple[tuple[Participant, ...], ...]:
    """The wave's hosts in batches: a canary batch first if asked, then by max_parallel.

    Linear in the hosts: membership is looked up in a set per service, not a list.
    """
    members = {s: frozenset(hosts[s]) for s in services}
    wave_hosts = sorted(set().union(*members.values()))
    size = strategy.batch_size(len(wave_hosts))
    head = [wave_hosts[:canary]] if canary else []
    rest = wave_hosts[min(canary, len(wave_hosts)) :]
    groups = head + [rest[i : i + size] for i in range(0, len(rest), size)]
    return tuple(
        tuple(
            Participant(h, s, target[s], _from_version(h, s, current, running))
            for h in group
            for s in services
            if h in members[s]
        )
        for group in groups
        if group
    )


def _from_version(
    host: str,
    service: str,
    current: Mapping[str, str],
    running: Mapping[str, Mapping[str, str]] | None,
) -> str | None:
    if running is not None and host in running:
        return running[host].get(service)
    return current.get(service)
