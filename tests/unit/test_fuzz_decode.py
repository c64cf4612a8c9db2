"""Property tests of the decode-and-verify path, no broker (SPEC 7, invariant I6).

A valid command, signed with the coordinator's key and addressed to HOST, is mutated
(a byte flipped or replaced, one JSON value replaced, a field dropped or added, the
kind changed, the id, `to`, `expires_at` or `sent_at` moved, a body field nudged, a
signature taken from another envelope or made with another key) and fed through what
an agent runs on every delivery: `shared.messages.decode`, then
`agent.trust.check_command` (which calls `shared.signing.check`). The property: the
mutated bytes are refused (`DecodeError` or `Refused`) unless they decode to the same
envelope, i.e. its canonical form (what the signature covers) equals the original's.
Reports get the same property through `coordinator.trust.admit` with an approved key.

`now` is fixed and passed in, so every example is deterministic. The strategies and
`mutated` are shared with tests/test_fuzz_consumers.py, which throws the same kinds of
input at the real consumers through the real broker.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.trust import check_command
from coordinator import trust as coordinator_trust
from shared import signing
from shared.errors import DecodeError, Refused
from shared.messages import (
    BODIES,
    ID,
    Abort,
    Alert,
    Body,
    Commit,
    Envelope,
    Heartbeat,
    Ping,
    Prepare,
    Revert,
    ServiceState,
    StepResult,
    Vote,
    decode,
    decode_alert,
    encode,
    make,
)
from shared.specs import HealthSpec, ServiceVersion

HOST = "host-a"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SKEW = 30.0
COORDINATOR = signing.generate()
AGENT = signing.generate()
STRANGER = signing.generate()
KINDS = [body.KIND for body in BODIES]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
ids = st.from_regex(ID, fullmatch=True)
names = st.sampled_from(["payments", "orders", "mail"])
versions = st.sampled_from(["1.0.0", "2.0.0", "2.0.1-rc.1"])


@st.composite
def specs(draw: st.DrawFn) -> ServiceVersion:
    return ServiceVersion(
        name=draw(names),
        version=draw(versions),
        artifact="file:///srv/artifacts/dir",
        run="./serve --port ${meta.port}",
        env=draw(st.dictionaries(st.sampled_from(["A", "B"]), st.text(max_size=5), max_size=2)),
        health=HealthSpec(http="http://127.0.0.1:1/health"),
    )


command_bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(Prepare, deployment_id=ids, spec=specs(), from_version=st.none() | versions,
              rollback=st.booleans()),
    st.builds(Commit, deployment_id=ids, service=names, version=versions),
    st.builds(Abort, deployment_id=ids, service=names),
    st.builds(Revert, deployment_id=ids, service=names, to=st.none() | specs()),
    st.just(Ping()),
)  # fmt: skip


def signed_command(body: Body, key: Any = COORDINATOR) -> Envelope:
    envelope = make(body, "coordinator", to=HOST, sent_at=NOW - timedelta(seconds=1),
                    expires_at=NOW + timedelta(seconds=60))  # fmt: skip
    return signing.Signer(key).sign(envelope)


# --- mutations -------------------------------------------------------------------


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into `doc` (dict keys and list indexes), the root excluded."""
    found: list[tuple[Any, ...]] = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in items:
        found.append((*prefix, key))
        found.extend(_paths(value, (*prefix, key)))
    return found


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    return _at(doc, path[:-1])


def _nudged(value: Any, draw: st.DrawFn) -> Any:
    """A value close to `value`: what a forger changes to get a different effect."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + draw(st.sampled_from([1, -1, 0.5]))
    if isinstance(value, str) and value:
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + draw(st.characters(codec="utf-8")) + value[i + 1 :]
    return draw(json_values)


def _moved_time(text: Any, draw: st.DrawFn) -> Any:
    if not isinstance(text, str):
        return draw(json_values)
    seconds = draw(st.integers(1, 10**6)) * draw(st.sampled_from([1, -1]))
    moved = datetime.fromisoformat(text) + timedelta(seconds=seconds)
    return moved.isoformat()


Sign = Callable[[Body], Envelope]
"""Wraps a body in a fresh envelope signed with the key the receiver trusts."""


@st.composite
def mutated(
    draw: st.DrawFn, original: Envelope, bodies: st.SearchStrategy[Body], sign: Sign
) -> bytes:
    """The wire bytes of `original` with one mutation applied; `bodies` and `sign` make
    the genuine envelopes whose signatures are transplanted or imitated."""
    raw = encode(original)
    doc = json.loads(raw)
    how = draw(st.sampled_from(
        ["flip", "byte", "replace", "nudge", "drop", "add", "kind", "field", "transplant",
         "resign"]
    ))  # fmt: skip
    if how == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1 :]
    if how == "byte":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    if how in ("replace", "nudge", "drop"):
        path = draw(st.sampled_from(_paths(doc)))
        parent = _parent(doc, path)
        if how == "drop":
            del parent[path[-1]]
        elif how == "replace":
            parent[path[-1]] = draw(json_values)
        else:
            parent[path[-1]] = _nudged(parent[path[-1]], draw)
    elif how == "add":
        dicts = [()] + [p for p in _paths(doc) if isinstance(_at(doc, p), dict)]
        where = _at(doc, draw(st.sampled_from(dicts)))
        where[draw(st.text(max_size=12))] = draw(json_values)
    elif how == "kind":
        doc["kind"] = draw(st.sampled_from(KINDS) | st.text(max_size=12))
    elif how == "field":
        field = draw(st.sampled_from(["id", "to", "expires_at", "sent_at", "sender"]))
        doc[field] = {
            "id": lambda: draw(ids),
            "to": lambda: draw(st.sampled_from(["host-b", "HOST-A", "h1.", ""]) | st.none()),
            "expires_at": lambda: _moved_time(doc["expires_at"], draw),
            "sent_at": lambda: _moved_time(doc["sent_at"], draw),
            "sender": lambda: draw(st.sampled_from(["agent:host-b", "coordinator2", "x"])),
        }[field]()
    elif how == "transplant":  # a genuine signature, made for another envelope
        doc["sig"] = sign(draw(bodies)).sig
    else:  # the content replaced and signed again, by a key nobody trusts
        other = draw(bodies)
        forged = original.model_copy(update={"kind": other.KIND, "body": other})
        doc = json.loads(encode(signing.Signer(STRANGER).sign(forged)))
    return json.dumps(doc).encode()


def _same(decoded: Envelope, original: Envelope) -> bool:
    """The same envelope: what the signature covers is identical (`sig` may differ)."""
    same_content = signing.canonical(decoded) == signing.canonical(original)
    return same_content and decoded == original.model_copy(update={"sig": decoded.sig})


# --- properties ------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), body=command_bodies)
def test_a_mutated_command_is_refused_unless_it_is_the_same_command(
    data: st.DataObject, body: Body
) -> None:
    original = signed_command(body)
    check_command(decode(encode(original)), HOST, COORDINATOR.public_key(), NOW, SKEW)
    raw = data.draw(mutated(original, command_bodies, signed_command), label="mutated")
    try:
        envelope = decode(raw)
        check_command(envelope, HOST, COORDINATOR.public_key(), NOW, SKEW)
    except (DecodeError, Refused):
        return
    assert _same(envelope, original), f"accepted a different command: {raw!r}"


@settings(max_examples=100, deadline=None)
@given(body=command_bodies, indent=st.none() | st.integers(0, 4), sort=st.booleans())
def test_the_same_command_written_differently_is_accepted_as_itself(
    body: Body, indent: int | None, sort: bool
) -> None:
    original = signed_command(body)
    raw = json.dumps(json.loads(encode(original)), indent=indent, sort_keys=sort).encode()
    envelope = decode(raw)
    check_command(envelope, HOST, COORDINATOR.public_key(), NOW, SKEW)
    assert _same(envelope, original)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_or_json_are_refused(raw: bytes) -> None:
    with pytest.raises((DecodeError, Refused)):
        check_command(decode(raw), HOST, COORDINATOR.public_key(), NOW, SKEW)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("sig", None, "unsigned"),
        ("to", "host-b", "bad_signature"),
        ("expires_at", (NOW + timedelta(days=1)).isoformat(), "bad_signature"),
        ("id", "another", "bad_signature"),
    ],
)
def test_each_refusal_names_its_code(field: str, value: Any, code: str) -> None:
    doc = json.loads(encode(signed_command(Commit(deployment_id="d1", service="mail",
                                                   version="1.0.0"))))  # fmt: skip
    doc[field] = value
    with pytest.raises(Refused) as refused:
        check_command(decode(json.dumps(doc).encode()), HOST, COORDINATOR.public_key(), NOW, SKEW)
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("to", "at", "code"),
    [("host-b", NOW, "wrong_host"), (HOST, NOW + timedelta(seconds=61 + SKEW), "expired")],
)
def test_a_genuine_command_for_another_host_or_too_late_is_refused(
    to: str, at: datetime, code: str
) -> None:
    envelope = signing.Signer(COORDINATOR).sign(
        make(Ping(), "coordinator", to=to, sent_at=NOW, expires_at=NOW + timedelta(seconds=60))
    )
    with pytest.raises(Refused) as refused:
        check_command(decode(encode(envelope)), HOST, COORDINATOR.public_key(), at, SKEW)
    assert refused.value.code == code


def test_the_signature_text_is_malleable_but_the_content_is_not() -> None:
    """base64 ignores the unused low bits of the last significant character: another
    `sig` text decodes to the same signature bytes. Harmless (a replay is caught by the
    id, and the content is what was signed), but a `sig` is not a unique name."""
    original = signed_command(Ping())
    assert original.sig is not None
    last = original.sig.rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    sig = original.sig.rstrip("=")[:-1] + twin + "=="
    assert base64.b64decode(sig) == base64.b64decode(original.sig)
    envelope = original.model_copy(update={"sig": sig})
    check_command(decode(encode(envelope)), HOST, COORDINATOR.public_key(), NOW, SKEW)
    assert _same(envelope, original)


# --- reports, as the coordinator admits them -----------------------------------------

report_bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(Vote, deployment_id=ids, host_id=st.just(HOST), service=names, version=versions,
              yes=st.booleans(), reason=st.text(max_size=10)),
    st.builds(StepResult, deployment_id=ids, host_id=st.just(HOST), service=names,
              step=st.sampled_from(["commit", "revert", "abort"]), ok=st.booleans(),
              running=st.none() | versions),
    st.builds(Heartbeat, host_id=st.just(HOST), services=st.lists(st.builds(
        ServiceState, service=names, version=st.none() | versions,
        health=st.sampled_from(["healthy", "unhealthy"])), max_size=2)),
)  # fmt: skip


def signed_report(body: Body) -> Envelope:
    return signing.Signer(AGENT).sign(make(body, f"agent:{HOST}", sent_at=NOW))


def _admit(envelope: Envelope) -> coordinator_trust.Verdict:
    known = coordinator_trust.KnownKey(HOST, signing.public_text(AGENT.public_key()), "approved")
    return coordinator_trust.admit(envelope, known, "guest", per_host_users=False, now=NOW,
                                   skew=SKEW)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), body=report_bodies)
def test_a_mutated_report_is_refused_unless_it_is_the_same_report(
    data: st.DataObject, body: Body
) -> None:
    original = signed_report(body)
    assert isinstance(_admit(decode(encode(original))), coordinator_trust.Accept)
    raw = data.draw(mutated(original, report_bodies, signed_report), label="mutated")
    try:
        envelope = decode(raw)
        verdict = _admit(envelope)
    except (DecodeError, Refused):
        return
    assert isinstance(verdict, coordinator_trust.Accept)
    assert _same(envelope, original), f"admitted a different report: {raw!r}"


def test_an_alert_with_fields_of_its_own_is_accepted() -> None:
    """SPEC 5: an alert body may carry any other fields (kept, ignored)."""
    raw = b'{"service": "orders", "severity": "critical", "labels": {"env": "prod"}}'
    envelope = decode_alert(raw)
    assert isinstance(envelope.body, Alert)
    assert (envelope.body.service, envelope.body.severity) == ("orders", "critical")
    assert envelope.body.model_dump()["labels"] == {"env": "prod"}
