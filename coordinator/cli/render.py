"""Text rendering of the coordinator's documents for people at a terminal."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, get_args

from coordinator.machine import PPhase

_PHASE_ORDER = {phase: i for i, phase in enumerate(get_args(PPhase))}


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return f"{max(0.0, time.time() - ts):.1f}s ago"


def _set(services: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(services.items())) or "(empty)"


def register(doc: dict[str, Any]) -> str:
    return "\n".join(f"{v['name']} {v['version']}: {v['result']}" for v in doc["versions"])


def plan(doc: dict[str, Any]) -> str:
    lines = [f"target: {_set(doc['services'])}"]
    waves = doc["plan"]["waves"]
    canary = doc.get("strategy", {}).get("canary", 0)
    if not waves:
        lines.append("nothing to change")
    for i, wave in enumerate(waves, 1):
        sync = " (synchronized)" if wave["synchronized"] else ""
        lines.append(f"wave {i}: {', '.join(wave['services'])}{sync}")
        for j, batch in enumerate(wave["batches"], 1):
            label = "canary" if canary and i == j == 1 else f"batch {j}"
            moves = ", ".join(
                f"{p['host']}:{p['service']} {p['from_version'] or '-'} -> {p['version']}"
                for p in batch
            )
            lines.append(f"  {label}: {moves}")
        lines.append(f"  after: {_set(wave['state_after'])}")
    return "\n".join(lines)


def deployment(doc: dict[str, Any]) -> str:
    lines = [
        f"deployment {doc['deployment_id']}: {doc['state']}"
        + (f" ({doc['reason']})" if doc.get("reason") else ""),
        f"release {doc['from_release_id']} -> {doc['release_id']}: {_set(doc['services'])}",
    ]
    for p in doc["participants"]:
        reason = f"  {p['reason']}" if p.get("reason") else ""
        lines.append(
            f"  {p['host']:<12} {p['service']:<12} {p['from_version'] or '-'} -> "
            f"{p['version']:<8} {p['state']}{reason}"
        )
    return "\n".join(lines)


def progress(doc: dict[str, Any]) -> str:
    """One line per phase of a deployment followed by `--wait`: how many participants are
    in each state, in protocol order, as wide for 2,000 hosts as for 2
    (`3f2a9c0d1b2e committing: 28/40 prepared, 12/40 committed`)."""
    total = len(doc["participants"])
    counts = Counter(p["state"] for p in doc["participants"])
    order = sorted(counts, key=lambda s: (_PHASE_ORDER.get(s, len(_PHASE_ORDER)), s))
    states = ", ".join(f"{counts[s]}/{total} {s}" for s in order) or "no participants"
    return f"{doc['deployment_id']} {doc['state']}: {states}"


def status(doc: dict[str, Any]) -> str:
    lines = [
        f"release: {doc['release_id']} (desired {doc['desired_release_id']})",
        f"services: {_set(doc['services'])}",
    ]
    active = doc.get("coordinator")
    if active:
        lines.append(f"coordinator: {active['host']} pid {active['pid']}, active since "
                     f"{_ago(active['since'])} (epoch {active['epoch']})")  # fmt: skip
    for host in doc["hosts"]:
        alive = "alive" if host["alive"] else "LOST"
        lines.append(f"{host['host_id']} [{alive}, seen {_ago(host['last_seen'])}]")
        for s in host["services"]:
            lines.append(f"  {s['service']:<12} {s['version'] or '-':<8} {s['health']}")
    return "\n".join(lines)


def history(doc: dict[str, Any]) -> str:
    lines = []
    for d in doc["deployments"]:
        reason = f": {d['reason']}" if d["reason"] else ""
        lines.append(
            f"{d['deployment_id']} release {d['from_release_id']} -> {d['release_id']} "
            f"[{d['trigger']}] {d['state']}{reason}"
        )
    return "\n".join(lines) or "no deployments yet"


def agents(doc: dict[str, Any]) -> str:
    lines = []
    for a in doc["agents"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(a["labels"].items()))
        running = ", ".join(f"{s['service']} {s['version']}" for s in a["services"]) or "-"
        seen = _ago(a["last_seen"])
        key = a.get("key_state") or "-"
        lines.append(
            f"{a['host_id']:<12} {a['state']:<6} key {key:<8} {labels:<24} seen {seen}  {running}"
        )
    return "\n".join(lines) or "no agents"


def agent_action(doc: dict[str, Any]) -> str:
    """The answer to `agents approve|reject|revoke|remove|converge HOST`."""
    if "overwrite" in doc:
        return f"{doc['host_id']}: will converge"
    if doc.get("key_state") is None:
        return f"{doc['host_id']}: removed (it may enroll again, with a new key)"
    return f"{doc['host_id']}: key {doc.get('fingerprint')} {doc['key_state']}"


def event(doc: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(doc["ts"]))
    return f"{when} {doc['type']} {doc.get('deployment_id') or ''} {doc.get('data') or ''}".rstrip()
