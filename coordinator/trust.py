"""Which reports the coordinator believes (SPEC 7, invariant I6), and who may ask.

Pure decisions, no I/O: the coordinator's loop looks up what it knows of the host and
calls `admit` for every agent report, then acts on the verdict:

- `Refuse(code, detail)`: dead-letter it (`unsigned`, `bad_signature`, `wrong_user`,
  `wrong_sender`, `future`, `unknown_host`, `key_mismatch`);
- `Enroll(key)`: a host never seen, announcing its key in a correctly self-signed hello
  or heartbeat: record it `pending` (or `approved` with `--auto-approve`);
- `Ignore(why)`: a key that is not approved: the report changes nothing;
- `Accept()`: act on it.

`authorize` decides whether a request's broker-validated user may ask at all.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import signing, topology
from shared.errors import Refused
from shared.messages import AgentHello, Envelope, Heartbeat

KeyState = Literal["pending", "approved", "rejected", "revoked"]


@dataclass(frozen=True)
class KnownKey:
    """What the coordinator holds of a host's key."""

    host_id: str
    public_key: str
    state: KeyState


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Enroll:
    public_key: str


@dataclass(frozen=True)
class Ignore:
    why: str


Verdict = Accept | Enroll | Ignore


def admit(
    envelope: Envelope,
    known: KnownKey | None,
    user_id: str | None,
    *,
    per_host_users: bool,
    now: datetime,
    skew: float,
) -> Verdict:
    """The verdict on one report; `Refused` when it must be dead-lettered."""
    host = str(getattr(envelope.body, "host_id", ""))
    if envelope.sender != f"agent:{host}":
        raise Refused("wrong_sender", f"sender {envelope.sender!r} does not match host {host!r}")
    if per_host_users and user_id != topology.agent_user(host):
        raise Refused("wrong_user", f"a report about {host!r} must come from broker user "
                      f"{topology.agent_user(host)!r}, not {user_id!r}")  # fmt: skip
    if envelope.sent_at > now + timedelta(seconds=skew):
        raise Refused("future", f"sent_at {envelope.sent_at.isoformat()} lies ahead of "
                      f"{now.isoformat()} by more than {skew:g}s")  # fmt: skip
    announced = announced_key(envelope)
    if known is None:
        if announced is None:
            raise Refused("unknown_host", f"no agent {host!r} has enrolled; "
                          f"{envelope.kind} refused")  # fmt: skip
        signing.check(envelope, _public(announced))
        return Enroll(announced)
    if announced is not None and announced != known.public_key:
        signing.check(envelope, _public(announced))  # a mismatch must at least be genuine
        raise Refused("key_mismatch", f"{host!r} presented key {signing.fingerprint(announced)}"
                      f", not its enrolled {signing.fingerprint(known.public_key)}")  # fmt: skip
    signing.check(envelope, _public(known.public_key))
    if known.state != "approved":
        return Ignore(f"key {known.state}")
    return Accept()


def announced_key(envelope: Envelope) -> str | None:
    """The public key a hello or heartbeat announces (None for other reports)."""
    body = envelope.body
    if isinstance(body, AgentHello | Heartbeat):
        return body.public_key
    return None


def _public(text: str) -> Ed25519PublicKey:
    try:
        return _parsed(text)
    except ValueError as e:
        raise Refused("bad_signature", str(e)) from e


@lru_cache(maxsize=16_384)
def _parsed(text: str) -> Ed25519PublicKey:
    """A public key parsed once (every report of a host is checked with the same key)."""
    return signing.public_from_text(text)


def authorize(user_id: str | None, operators: Collection[str]) -> None:
    """Raise `Refused` unless `user_id` may send requests (any user when no allow-list)."""
    if operators and user_id not in operators:
        raise Refused("not_operator", f"broker user {user_id!r} is not in the operators "
                      "allow-list (--operators)")  # fmt: skip


def key_transition(current: KeyState, action: str) -> KeyState:
    """The key state after an operator's approve, reject or revoke; ValueError if none."""
    if action == "approve" and current in ("pending", "approved"):
        return "approved"
    if action == "reject" and current in ("pending", "rejected"):
        return "rejected"
    if action == "revoke" and current in ("approved", "revoked"):
        return "revoked"
    raise ValueError(f"cannot {action} a key that is {current}")
