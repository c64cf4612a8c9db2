"""Issue 8: the pure trust decisions, table-tested with real Ed25519 keys, no broker.

`agent.trust.check_command` (what an agent executes) and `coordinator.trust.admit`
(which reports the coordinator believes), `authorize` (who may ask) and
`key_transition` (approve/reject/revoke), each refusal with its own code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent import trust as agent_trust
from coordinator import trust
from shared import signing
from shared.errors import Refused
from shared.messages import AgentHello, Commit, Envelope, Heartbeat, Vote, make

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
COORDINATOR = signing.Signer(signing.generate())
AGENT = signing.Signer(signing.generate())
STRANGER = signing.Signer(signing.generate())
TRUSTED = signing.public_from_text(COORDINATOR.public)


def _command(signer: signing.Signer | None = COORDINATOR, **fields: Any) -> Envelope:
    envelope = make(
        Commit(deployment_id="d1", service="orders", version="2.0.0"), "coordinator",
        **{"to": "host-a", "sent_at": NOW, "expires_at": NOW + timedelta(minutes=5), **fields},
    )  # fmt: skip
    return signer.sign(envelope) if signer else envelope


def _tampered(envelope: Envelope, **fields: Any) -> Envelope:
    return envelope.model_copy(update=fields)


# --- agent: which commands run ----------------------------------------------------

COMMAND_CASES = [
    ("fresh, signed, addressed here", _command(), NOW, None),
    ("unsigned", _command(None), NOW, "unsigned"),
    ("signed by another key", _command(STRANGER), NOW, "bad_signature"),
    ("junk signature", _tampered(_command(), sig="AAAA"), NOW, "bad_signature"),
    ("signature not base64", _tampered(_command(), sig="%%%"), NOW, "bad_signature"),
    (
        "a field altered after signing",
        _tampered(_command(), body=Commit(deployment_id="d1", service="orders", version="9.9.9")),
        NOW,
        "bad_signature",
    ),
    ("re-addressed after signing", _tampered(_command(), to="host-b"), NOW, "bad_signature"),
    (
        "expiry pushed after signing",
        _tampered(_command(), expires_at=NOW + timedelta(days=9)),
        NOW + timedelta(days=1),
        "bad_signature",
    ),
    ("addressed to another host", _command(to="host-b"), NOW, "wrong_host"),
    ("addressed to no host", _command(to=None), NOW, "wrong_host"),
    ("no expiry", _command(expires_at=None), NOW, "expired"),
    ("expired, within the skew", _command(), NOW + timedelta(minutes=5, seconds=29), None),
    ("expired, past the skew", _command(), NOW + timedelta(minutes=5, seconds=31), "expired"),
]


@pytest.mark.parametrize(
    ("case", "envelope", "now", "refusal"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES]
)
def test_agent_verifies_every_command_and_names_each_refusal(
    case: str, envelope: Envelope, now: datetime, refusal: str | None
) -> None:
    if refusal is None:
        agent_trust.check_command(envelope, "host-a", TRUSTED, now, skew=30)
        return
    with pytest.raises(Refused) as info:
        agent_trust.check_command(envelope, "host-a", TRUSTED, now, skew=30)
    assert info.value.code == refusal
    assert info.value.reason.startswith(f"{refusal}: ")


def test_a_replayed_command_is_refused_with_its_own_reason() -> None:
    refusal = agent_trust.replayed(_command())
    assert refusal.code == "replayed"


# --- coordinator: which reports are believed ---------------------------------------

KNOWN = trust.KnownKey("host-a", AGENT.public, "approved")


def _report(
    body: Any, signer: signing.Signer | None = AGENT, sender: str = "agent:host-a", **fields: Any
) -> Envelope:
    envelope = make(body, sender, **{"sent_at": NOW, **fields})
    return signer.sign(envelope) if signer else envelope


def _hello(key: str = AGENT.public, signer: signing.Signer = AGENT) -> Envelope:
    return _report(AgentHello(host_id="host-a", labels={}, services=[], public_key=key), signer)


VOTE = Vote(deployment_id="d1", host_id="host-a", service="orders", version="2.0.0", yes=True)

ADMIT_CASES: list[tuple[str, Envelope, trust.KnownKey | None, str | None, Any]] = [
    ("approved key, own user", _report(VOTE), KNOWN, "lockstep-agent-host-a", trust.Accept()),
    (
        "new host announcing its key",
        _hello(),
        None,
        "lockstep-agent-host-a",
        trust.Enroll(AGENT.public),
    ),
    (
        "new host, hello signed by another key",
        _hello(signer=STRANGER),
        None,
        "lockstep-agent-host-a",
        "bad_signature",
    ),
    ("new host, no key announced", _report(VOTE), None, "lockstep-agent-host-a", "unknown_host"),
    (
        "pending key",
        _report(VOTE),
        trust.KnownKey("host-a", AGENT.public, "pending"),
        "lockstep-agent-host-a",
        trust.Ignore("key pending"),
    ),
    (
        "rejected key",
        _report(VOTE),
        trust.KnownKey("host-a", AGENT.public, "rejected"),
        "lockstep-agent-host-a",
        trust.Ignore("key rejected"),
    ),
    (
        "revoked key",
        _report(VOTE),
        trust.KnownKey("host-a", AGENT.public, "revoked"),
        "lockstep-agent-host-a",
        trust.Ignore("key revoked"),
    ),
    (
        "known host, new key announced",
        _hello(STRANGER.public, STRANGER),
        KNOWN,
        "lockstep-agent-host-a",
        "key_mismatch",
    ),
    (
        "known host, report signed by another key",
        _report(VOTE, STRANGER),
        KNOWN,
        "lockstep-agent-host-a",
        "bad_signature",
    ),
    ("unsigned report", _report(VOTE, None), KNOWN, "lockstep-agent-host-a", "unsigned"),
    (
        "known host, a new key announced in a report it did not sign",
        _hello(STRANGER.public, AGENT),
        KNOWN,
        "lockstep-agent-host-a",
        "bad_signature",
    ),
    (
        "known host, a new key announced unsigned",
        _report(Heartbeat(host_id="host-a", services=[], public_key=STRANGER.public), None),
        KNOWN,
        "lockstep-agent-host-a",
        "unsigned",
    ),
    ("another host's broker user", _report(VOTE), KNOWN, "lockstep-agent-host-b", "wrong_user"),
    ("no broker user", _report(VOTE), KNOWN, None, "wrong_user"),
    (
        "sender is not the host",
        _report(VOTE, sender="agent:host-b"),
        KNOWN,
        "lockstep-agent-host-a",
        "wrong_sender",
    ),
    (
        "sent in the year 3000",
        _report(Heartbeat(host_id="host-a", services=[]), sent_at=NOW.replace(year=3000)),
        KNOWN,
        "lockstep-agent-host-a",
        "future",
    ),
    (
        "sent a little ahead, within the skew",
        _report(VOTE, sent_at=NOW + timedelta(seconds=20)),
        KNOWN,
        "lockstep-agent-host-a",
        trust.Accept(),
    ),
]


@pytest.mark.parametrize(
    ("case", "envelope", "known", "user", "expected"), ADMIT_CASES,
    ids=[c[0] for c in ADMIT_CASES],
)  # fmt: skip
def test_coordinator_believes_only_approved_keys_from_their_own_user(
    case: str, envelope: Envelope, known: trust.KnownKey | None, user: str | None, expected: Any
) -> None:
    def verdict() -> trust.Verdict:
        return trust.admit(envelope, known, user, per_host_users=True, now=NOW, skew=30)

    if isinstance(expected, str):
        with pytest.raises(Refused) as info:
            verdict()
        assert info.value.code == expected
    else:
        assert verdict() == expected


def test_shared_agent_users_skip_only_the_user_check() -> None:
    envelope = _report(VOTE)
    assert trust.admit(envelope, KNOWN, "guest", per_host_users=False, now=NOW, skew=30) == (
        trust.Accept()
    )
    with pytest.raises(Refused, match="bad_signature"):
        trust.admit(_report(VOTE, STRANGER), KNOWN, "guest", per_host_users=False, now=NOW,
                    skew=30)  # fmt: skip


@pytest.mark.parametrize(
    ("user", "operators", "allowed"),
    [("alice", frozenset(), True), (None, frozenset(), True), ("alice", {"alice"}, True),
     ("mallory", {"alice"}, False), (None, {"alice"}, False)],
)  # fmt: skip
def test_requests_are_authorized_by_the_operators_allow_list(
    user: str | None, operators: frozenset[str], allowed: bool
) -> None:
    if allowed:
        trust.authorize(user, operators)
    else:
        with pytest.raises(Refused, match="not_operator"):
            trust.authorize(user, operators)


@pytest.mark.parametrize(
    ("current", "action", "after"),
    [("pending", "approve", "approved"), ("pending", "reject", "rejected"),
     ("approved", "revoke", "revoked"), ("approved", "approve", "approved"),
     ("rejected", "approve", None), ("revoked", "approve", None), ("pending", "revoke", None),
     ("approved", "reject", None)],
)  # fmt: skip
def test_key_state_moves_only_along_the_operator_actions(
    current: trust.KeyState, action: str, after: str | None
) -> None:
    if after is None:
        with pytest.raises(ValueError, match=f"cannot {action}"):
            trust.key_transition(current, action)
    else:
        assert trust.key_transition(current, action) == after
