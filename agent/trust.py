"""What an agent executes (SPEC 7, invariant I6): only fresh commands signed by the
coordinator's key and addressed to this host.

The agent service calls `check_command` on every command it receives and again on
every command it reads back from its own store after a restart, before anything
touches the host; the replay check (an id executed before) needs the store and is
made by the caller. Each refusal is a `Refused` with its own code: `unsigned`,
`bad_signature`, `wrong_host`, `expired` (and `replayed`, from the caller), which the
transport dead-letters with that reason. Pure: no I/O, the clock is an argument.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import signing
from shared.errors import Refused
from shared.messages import Envelope


def check_command(
    envelope: Envelope, host_id: str, trusted: Ed25519PublicKey, now: datetime, skew: float
) -> None:
    """Raise `Refused` unless `envelope` may run on `host_id` at `now`."""
    signing.check(envelope, trusted)
    if envelope.to != host_id:
        raise Refused("wrong_host", f"{envelope.kind} {envelope.id} is addressed to "
                      f"{envelope.to!r}; this is {host_id!r}")  # fmt: skip
    if envelope.expires_at is None:
        raise Refused("expired", f"{envelope.kind} {envelope.id} carries no expiry")
    if now > envelope.expires_at + timedelta(seconds=skew):
        raise Refused("expired", f"{envelope.kind} {envelope.id} expired at "
                      f"{envelope.expires_at.isoformat()} (now {now.isoformat()}, "
                      f"allowed skew {skew:g}s)")  # fmt: skip


def replayed(envelope: Envelope) -> Refused:
    """The refusal of a command whose id this agent has executed before."""
    return Refused("replayed", f"{envelope.kind} {envelope.id} was received before")
