"""Agents' keys at the coordinator: enrollment, approval, and the gate on every report.

The coordinator's loop calls `Enrollment.admit` before it handles any agent report and
acts only when it returns True. The decision is `coordinator.trust.admit` (pure); this
module carries it out: a new host is recorded `pending` (or `approved` with
`--auto-approve`) and gets its command queue declared; a report from a key that is not
approved is dropped (counted, changes nothing); a refused one raises `Refused`, which
the transport dead-letters, and a key mismatch is also published as
`agent.key_mismatch`. `control` serves `lockstep agents approve|reject|revoke|remove`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coordinator import trust
from coordinator.store import Store
from shared import log, metrics, signing, topology
from shared.config import SecuritySettings
from shared.errors import Refused, UserError
from shared.messages import AgentHello, Heartbeat
from shared.transport import Broker, Delivery

MISMATCHES_KEPT = 10_000
"""How many (host, key) mismatches are remembered so each is published once."""

Emit = Callable[[str | None, str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Policy:
    """How the coordinator treats agents and requesters (SPEC 7)."""

    security: SecuritySettings = field(default_factory=SecuritySettings)
    auto_approve: bool = False
    """Approve every new key at once (labs and demos: anyone who can publish a report
    with a fresh host id then receives commands, and their reports are believed)."""
    operators: frozenset[str] = frozenset()
    """Broker users allowed to send requests; empty: any user the broker lets publish."""


class Enrollment:
    def __init__(
        self, store: Store, broker: Broker, policy: Policy, queue_type: topology.QueueType,
        emit: Emit,
    ) -> None:  # fmt: skip
        self.store = store
        self.broker = broker
        self.policy = policy
        self.queue_type = queue_type
        self._emit = emit
        self._declared: set[str] = set()
        self.heard: dict[str, float] = {}
        """When a host whose key is not approved last reported (memory only: shown by
        `lockstep agents`, believed by nothing)."""
        self._mismatches: set[tuple[str, str]] = set()
        self._keys: dict[str, trust.KnownKey] = {}
        """The store's enrolled keys, read once per host: every change to them goes
        through this object, so no report costs a query."""
        self._log = log.get("enrollment")

    async def _known(self, host: str) -> trust.KnownKey | None:
        known = self._keys.get(host)
        if known is None:
            known = await self.store.known_key(host)
            if known is not None:
                self._keys[host] = known
        return known

    async def admit(self, delivery: Delivery) -> bool:
        """Whether to act on this report; `Refused` if it must be dead-lettered."""
        envelope = delivery.envelope
        host = str(getattr(envelope.body, "host_id", ""))
        known = await self._known(host)
        try:
            verdict = trust.admit(
                envelope, known, delivery.user_id,
                per_host_users=self.policy.security.agent_users == "per-host",
                now=datetime.now(UTC), skew=self.policy.security.clock_skew,
            )  # fmt: skip
        except Refused as e:
            if e.code == "key_mismatch":
                await self._mismatch(host, trust.announced_key(envelope) or "", e.reason)
            raise
        match verdict:
            case trust.Enroll():
                return await self._enroll(host, verdict.public_key, envelope.body)
            case trust.Ignore():
                self.heard[host] = time.time()
                metrics.IGNORED.labels(verdict.why).inc()
                self._log.debug("report.ignored", host_id=host, kind=envelope.kind,
                                why=verdict.why)  # fmt: skip
                return False
        await self._declare(host)
        return True

    async def _enroll(self, host: str, public_key: str, body: object) -> bool:
        labels = body.labels if isinstance(body, AgentHello | Heartbeat) else None
        state: trust.KeyState = "approved" if self.policy.auto_approve else "pending"
        await self.store.enroll(host, public_key, labels or {}, state)
        self._keys.pop(host, None)  # a row from before keys keeps its first one: re-read
        await self._declare(host)
        self._log.info("agent.enrolled", host_id=host, key_state=state,
                       fingerprint=signing.fingerprint(public_key))  # fmt: skip
        await self._emit(None, "agent.registered", {
            "host_id": host, "labels": labels or {}, "key_state": state,
            "fingerprint": signing.fingerprint(public_key)})  # fmt: skip
        return state == "approved"

    async def _declare(self, host: str) -> None:
        """Declare the host's command queue once per process (the agent may not)."""
        if host not in self._declared:
            await self.broker.declare_queue(topology.agent_queue(host, self.queue_type))
            self._declared.add(host)

    async def _mismatch(self, host: str, presented: str, reason: str) -> None:
        if (host, presented) in self._mismatches:
            return  # once per presented key: an agent repeats it every heartbeat
        if len(self._mismatches) >= MISMATCHES_KEPT:
            self._mismatches.clear()
        self._mismatches.add((host, presented))
        self._log.warning("agent.key_mismatch", host_id=host, reason=reason)
        doc = {"host_id": host, "presented": signing.fingerprint(presented), "reason": reason}
        await self._emit(None, "agent.key_mismatch", doc)

    async def control(self, action: str, host: str | None) -> dict[str, Any]:
        """approve, reject, revoke or remove `host`'s key; its new state."""
        held = await self._known(host or "")
        if host is None or held is None:
            raise UserError("HOST", f"no agent {host!r} has enrolled")
        if action == "remove":
            await self.store.remove_agent(host)
            self._keys.pop(host, None)
            self._declared.discard(host)
            await self._emit(None, "agent.removed", {"host_id": host})
            return {"host_id": host, "key_state": None}
        try:
            state = trust.key_transition(held.state, action)
        except ValueError as e:
            raise UserError("HOST", f"{host}: {e}") from e
        await self.store.set_key_state(host, state)
        self._keys.pop(host, None)
        self._mismatches = {m for m in self._mismatches if m[0] != host}
        doc = {"host_id": host, "key_state": state,
               "fingerprint": signing.fingerprint(held.public_key)}  # fmt: skip
        await self._emit(None, f"agent.{state}", doc)
        return doc
