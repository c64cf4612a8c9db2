"""Tier (a): the deployment state machine (coordinator/machine.py), table-driven, no I/O.

Every test feeds events to the pure `step` function and looks at the deployment it
returns and the actions it asks for: no broker, no store, no mocks (CONVENTIONS 2).
Events are written compactly ("yes h1", "commit h2 fail unhealthy", "timer prepare")
so each table row is one line; `make` builds a deployment from "h1 h2 | h3" (batches
separated by "|", participants "host" or "host:service").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.machine import (
    ABORT_WAIT,
    TERMINAL,
    Action,
    Control,
    Deployment,
    Event,
    Failed,
    Finished,
    Key,
    Participant,
    Recovered,
    Send,
    Started,
    StartTimer,
    StepDone,
    TimedOut,
    Voted,
    from_dict,
    new,
    step,
    to_dict,
)
from shared.specs import Strategy

SERVICE = "web"
RANK = {"db": 0, "api": 1, "web": 2}
"""Providers rank lower: db <- api <- web."""

# --- helpers ------------------------------------------------------------------------


def key(text: str) -> Key:
    """ "h1" -> ("h1", "web"); "h1:api" -> ("h1", "api")."""
    host, _, service = text.partition(":")
    return (host, service or SERVICE)


def keys(text: str) -> tuple[Key, ...]:
    return tuple(key(t) for t in text.split())


def make(layout: str, **strategy: Any) -> Deployment:
    """A fresh deployment: batches separated by "|", participants by spaces."""
    batches = [
        [Participant(h, s, "2.0.0", "1.0.0") for h, s in keys(batch)]
        for batch in layout.split("|")
        if batch.strip()
    ]
    return new("d1", Strategy(**strategy), batches, RANK)


def ev(text: str) -> Event:
    """One event from its compact form.

    "started", "recovered", "yes h1", "no h1 disk full", "commit h1 ok",
    "revert h1:api fail boom", "abort h1 ok", "timer commit:0", "failed alert fired".
    """
    word, *rest = text.split()
    match word:
        case "started":
            return Started()
        case "recovered":
            return Recovered()
        case "yes" | "no":
            return Voted(key(rest[0]), word == "yes", " ".join(rest[1:]))
        case "commit" | "revert" | "abort":
            return StepDone(key(rest[0]), word, rest[1] == "ok", " ".join(rest[2:]))
        case "timer":
            return TimedOut(rest[0])
        case "failed":
            return Failed(" ".join(rest))
        case "pause" | "resume" | "abort!":
            return Control(word.rstrip("!"))  # type: ignore[arg-type]
    raise ValueError(text)


def feed(d: Deployment, *events: str) -> tuple[Deployment, list[Action]]:
    """`d` after every event, and the actions of the last one."""
    actions: list[Action] = []
    for text in events:
        d, actions = step(d, ev(text))
    return d, actions


def run(d: Deployment, *events: str) -> tuple[Deployment, list[list[Action]]]:
    """`d` after every event, and the actions of each event in turn."""
    every: list[list[Action]] = []
    for text in events:
        d, actions = step(d, ev(text))
        every.append(actions)
    return d, every


def sends(actions: list[Action], command: str | None = None) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and command in (None, a.command)]


def sent_to(actions: list[Action], command: str) -> list[Key]:
    return [k for a in sends(actions, command) for k in a.keys]


def phases(d: Deployment) -> dict[str, str]:
    """Participant phases by compact key ("h1", "h1:api")."""
    return {(h if s == SERVICE else f"{h}:{s}"): p.phase for (h, s), p in d.participants.items()}


def flat(every: list[list[Action]]) -> list[Action]:
    return [a for actions in every for a in actions]


def words(prefix: str, hosts: str, tail: str = "") -> list[str]:
    """ "commit", "h1 h2", "ok" -> ["commit h1 ok", "commit h2 ok"]."""
    return [f"{prefix} {h} {tail}".strip() for h in hosts.split()]


def prepared(layout: str, **strategy: Any) -> Deployment:
    """A deployment started with every participant voting YES (so committing batch 1)."""
    d = make(layout, **strategy)
    hosts = [f"{h}:{s}" for h, s in d.participants]
    d, _ = feed(d, "started", *words("yes", " ".join(hosts)))
    return d


# --- start and prepare --------------------------------------------------------------


def test_started_sends_prepare_to_every_participant_and_starts_prepare_timer() -> None:
    d = make("h1 h2:api | h3", prepare_timeout=7)
    after, actions = step(d, Started())
    assert actions == [
        Send("prepare", (("h1", "web"), ("h2", "api"), ("h3", "web"))),
        StartTimer("prepare", 7.0),
    ]
    assert after.phase == "preparing"
    assert after.decision is None


def test_deployment_without_participants_completes_at_once() -> None:
    after, actions = step(make(""), Started())
    assert after.phase == "completed"
    assert actions == [Finished("completed", "nothing to change")]
    assert sends(actions) == []


@pytest.mark.parametrize(
    ("layout", "votes"),
    [
        ("h1", "h1"),
        ("h1 h2 | h3", "h1 h2 h3"),
        ("h1 h2 | h3", "h3 h2 h1"),
        ("h1:db h1:api | h2:web", "h2:web h1:api h1:db"),
    ],
)
def test_all_yes_records_commit_decision_in_the_step_that_sends_the_first_commit(
    layout: str, votes: str
) -> None:
    d, _ = feed(make(layout), "started")
    *first, last = words("yes", votes)
    d, before = run(d, *first)
    assert d.decision is None
    assert sends(flat(before), "commit") == []
    after, actions = step(d, ev(last))
    assert after.decision == "commit"
    assert after.phase == "committing"
    assert sends(actions, "commit") == [Send("commit", after.steps[0])]
    assert actions[-1] == StartTimer("commit:0", 120.0)


@pytest.mark.parametrize(
    ("layout", "events", "aborted_to"),
    [
        ("h1", ["no h1 disk full"], "h1"),
        ("h1 h2 | h3", ["yes h1", "no h2 disk full"], "h1 h2 h3"),
        ("h1 h2 | h3", ["no h3 disk full", "yes h1"], "h1 h2 h3"),
        ("h1:db h1:api | h2", ["yes h2", "yes h1:db", "no h1:api disk full"], "h1:db h1:api h2"),
    ],
)
def test_one_no_vote_aborts_every_participant_naming_host_and_reason(
    layout: str, events: list[str], aborted_to: str
) -> None:
    d, _ = feed(make(layout), "started")
    d, every = run(d, *events)
    actions = flat(every)
    assert d.phase == "aborting"
    assert d.decision == "abort"
    assert sorted(sent_to(actions, "abort")) == sorted(keys(aborted_to))
    assert StartTimer("abort", ABORT_WAIT) in actions
    assert sends(actions, "commit") == []
    no = next(e for e in events if e.startswith("no"))
    host = key(no.split()[1])[0]
    assert host in d.reason
    assert "disk full" in d.reason


@pytest.mark.parametrize(
    ("layout", "events", "phase"),
    [
        ("h1 | h2", ["no h1 full", "abort h1 ok", "abort h2 ok"], "aborted"),
        ("h1 | h2", ["yes h2", "no h1 full", "abort h2 ok", "abort h1 ok"], "aborted"),
        ("h1 | h2", ["no h1 full", "abort h2 ok", "abort h1 ok"], "aborted"),
        ("h1 | h2", ["no h1 full", "abort h1 ok"], "aborting"),
        ("h1 | h2", ["no h1 full", "abort h1 ok", "timer abort"], "aborted"),
        ("h1 | h2", ["no h1 full", "timer abort"], "aborted"),
        ("h1 h2 h3", ["yes h2", "no h1 full", "timer abort"], "aborted"),
    ],
)
def test_abort_results_or_the_abort_timer_end_the_deployment_aborted(
    layout: str, events: list[str], phase: str
) -> None:
    d, every = run(feed(make(layout), "started")[0], *events)
    assert d.phase == phase
    finished = [a for a in flat(every) if isinstance(a, Finished)]
    if phase == "aborted":
        assert finished == [Finished("aborted", d.reason)]
        assert d.reason == "h1 voted NO for web 2.0.0: full"
    else:
        assert finished == []


@pytest.mark.parametrize(
    ("layout", "allow", "votes", "phase", "committed_to", "unavailable", "reason"),
    [
        ("h1 h2 h3", 0, "h1 h2", "aborting", "", "", "no vote from h3"),
        ("h1 h2 h3", 1, "h1", "aborting", "", "", "no vote from h2, h3"),
        ("h1:db h1:api h2", 0, "h1:db h2", "aborting", "", "", "no vote from h1"),
        ("h1 h2 h3", 1, "h1 h2", "committing", "h1 h2", "h3", ""),
        ("h1 h2 h3", 2, "h2", "committing", "h2", "h1 h3", ""),
        ("h1 | h2 | h3", 1, "h2 h3", "committing", "h2", "h1", ""),
        ("h1:db h1:api h2", 1, "h2", "committing", "h2", "h1:db h1:api", ""),
        ("h1 h2", 5, "", "aborting", "", "", "no participant is available"),
    ],
)  # fmt: skip
def test_prepare_timeout_aborts_beyond_allow_unavailable_else_commits_without_silent_hosts(
    layout: str,
    allow: int,
    votes: str,
    phase: str,
    committed_to: str,
    unavailable: str,
    reason: str,
) -> None:
    d, _ = feed(make(layout, allow_unavailable=allow), "started", *words("yes", votes))
    after, actions = step(d, TimedOut("prepare"))
    assert after.phase == phase
    assert sent_to(actions, "commit") == list(keys(committed_to))
    assert [k for k, p in after.participants.items() if p.phase == "unavailable"] == list(
        keys(unavailable)
    )
    if phase == "committing":
        assert after.decision == "commit"
        assert not any(key(u) in s for s in after.steps for u in unavailable.split())
    else:
        assert after.decision == "abort"
        assert sends(actions, "commit") == []
        assert reason in after.reason


# --- commit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "phase", "commits"),
    [
        ([], "committing", ["h1 h2"]),
        (["commit h1 ok"], "committing", ["h1 h2"]),
        (["commit h2 ok", "commit h1 ok"], "committing", ["h1 h2", "h3 h4"]),
        (["commit h1 ok", "commit h2 ok", "commit h3 ok"], "committing", ["h1 h2", "h3 h4"]),
        (
            ["commit h1 ok", "commit h2 ok", "commit h4 ok", "commit h3 ok"],
            "committing",
            ["h1 h2", "h3 h4", "h5"],
        ),
        (
            [*words("commit", "h1 h2 h3 h4 h5", "ok")],
            "completed",
            ["h1 h2", "h3 h4", "h5"],
        ),
    ],
)
def test_batches_commit_in_order_and_the_next_only_when_the_current_is_complete(
    events: list[str], phase: str, commits: list[str]
) -> None:
    d = make("h1 h2 | h3 h4 | h5")
    d, every = run(d, "started", *words("yes", "h1 h2 h3 h4 h5"), *events)
    assert [a.keys for a in sends(flat(every), "commit")] == [keys(c) for c in commits]
    assert d.phase == phase
    assert d.step_index == len(commits) - 1


def test_failed_commit_in_middle_batch_reverts_it_then_earlier_batch_consumers_first() -> None:
    d = prepared("h1:db h1:web h1:api | h2:api h2:db h3:web | h4:db h4:web")
    d, _ = feed(d, *words("commit", "h1:db h1:web h1:api", "ok"))
    d, every = run(d, "commit h2:db ok", "commit h3:web fail unhealthy")
    assert d.phase == "committing"  # h2:api still committing: wait for it
    assert flat(every) == []
    d, actions = step(d, ev("commit h2:api ok"))
    assert d.phase == "reverting"
    assert d.revert_steps == (
        keys("h3:web"),
        keys("h2:api"),
        keys("h2:db"),
        keys("h1:web"),
        keys("h1:api"),
        keys("h1:db"),
    )
    assert actions == [
        Send("abort", keys("h4:db h4:web")),
        Send("revert", keys("h3:web")),
        StartTimer("revert:0", 120.0),
    ]
    assert "h3" in d.reason
    assert "unhealthy" in d.reason
    order = ["h3:web", "h2:api", "h2:db", "h1:web", "h1:api", "h1:db"]
    for index, current in enumerate(order):
        d, actions = step(d, ev(f"revert {current} ok"))
        if index + 1 < len(order):
            assert actions == [
                Send("revert", keys(order[index + 1])),
                StartTimer(f"revert:{index + 1}", 120.0),
            ]
    assert d.phase == "rolled_back"
    assert actions == [Finished("rolled_back", d.reason)]
    assert phases(d) == {
        "h1:db": "reverted", "h1": "reverted", "h1:api": "reverted",
        "h2:api": "reverted", "h2:db": "reverted", "h3": "reverted",
        "h4:db": "aborting", "h4": "aborting",
    }  # fmt: skip


def test_batch_after_a_failed_commit_gets_abort_and_never_a_commit() -> None:
    d = prepared("h1 | h2 h3 | h4 h5")
    d, every = run(
        d, "commit h1 ok", "commit h2 fail unhealthy", "commit h3 ok",
        *words("revert", "h3 h2 h1", "ok"),
    )  # fmt: skip
    actions = flat(every)
    assert sent_to(actions, "abort") == list(keys("h4 h5"))
    assert not set(keys("h4 h5")) & set(sent_to(actions, "commit"))
    assert [a.keys for a in sends(actions, "revert")] == [keys("h2 h3"), keys("h1")]
    assert d.phase == "rolled_back"


@pytest.mark.parametrize(
    ("events", "phase", "names"),
    [
        (["revert h3 ok", "revert h1 ok"], "rolled_back", []),
        (["revert h3 fail disk", "revert h1 ok"], "failed", ["h3/web"]),
        (["revert h3 ok", "revert h1 fail disk"], "failed", ["h1/web"]),
        (["revert h3 fail disk", "revert h1 fail disk"], "failed", ["h1/web", "h3/web"]),
        (["timer revert:0", "revert h1 ok"], "failed", ["h3/web"]),
        (["revert h3 ok", "timer revert:1"], "failed", ["h1/web"]),
    ],
)
def test_revert_failure_or_revert_timeout_ends_failed_naming_the_host(
    events: list[str], phase: str, names: list[str]
) -> None:
    d = prepared("h1 | h3 | h5")
    d, _ = feed(d, "commit h1 ok", "commit h3 fail unhealthy")
    d, every = run(d, *events)
    assert d.phase == phase
    assert flat(every)[-1] == Finished(phase, d.reason)
    assert d.reason.startswith("commit failed on h3 for web: unhealthy")
    for name in names:
        assert name in d.reason


@pytest.mark.parametrize(
    ("events", "reverted"),
    [
        (["timer commit:0"], ["h1 h2"]),
        (["commit h1 ok", "timer commit:0"], ["h1 h2"]),
        (["commit h1 ok", "commit h2 ok", "commit h3 ok", "timer commit:1"], ["h3 h4", "h1 h2"]),
    ],
)
def test_commit_timeout_compensates_every_switched_participant(
    events: list[str], reverted: list[str]
) -> None:
    d = prepared("h1 h2 | h3 h4")
    d, every = run(d, *events)
    assert d.phase == "reverting"
    assert d.revert_steps == tuple(keys(r) for r in reverted)
    assert sends(flat(every), "revert") == [Send("revert", keys(reverted[0]))]
    assert "timed out" in d.reason


# --- canary hold and bake ------------------------------------------------------------


def test_canary_holds_after_the_first_batch_and_the_hold_timer_sends_the_second() -> None:
    d = prepared("h1 | h2 h3 | h4", canary=1, canary_bake=30)
    d, actions = step(d, ev("commit h1 ok"))
    assert d.phase == "holding"
    assert actions == [StartTimer("hold:1", 30.0)]
    d, actions = step(d, TimedOut("hold:1"))
    assert d.phase == "committing"
    assert actions == [Send("commit", keys("h2 h3")), StartTimer("commit:1", 120.0)]
    d, actions = feed(d, "commit h2 ok", "commit h3 ok")
    assert actions == [Send("commit", keys("h4")), StartTimer("commit:2", 120.0)]


@pytest.mark.parametrize(
    ("strategy", "phase"),
    [
        ({"canary": 1, "canary_bake": 0}, "committing"),
        ({"canary": 0, "canary_bake": 30}, "committing"),
        ({"canary": 1, "canary_bake": 30}, "holding"),
    ],
)
def test_hold_happens_only_with_canary_and_canary_bake(
    strategy: dict[str, Any], phase: str
) -> None:
    d, _ = feed(prepared("h1 | h2", **strategy), "commit h1 ok")
    assert d.phase == phase


def test_failure_while_holding_reverts_the_canary_and_aborts_the_rest() -> None:
    d = prepared("h1 | h2 h3", canary=1, canary_bake=30)
    d, actions = feed(d, "commit h1 ok", "failed canary crash loop")
    assert d.phase == "reverting"
    assert actions == [
        Send("abort", keys("h2 h3")),
        Send("revert", keys("h1")),
        StartTimer("revert:0", 120.0),
    ]
    assert d.reason == "canary crash loop"


@pytest.mark.parametrize(
    ("bake", "events", "phase", "last"),
    [
        (0, [], "completed", [Finished("completed", "")]),
        (60, [], "baking", [StartTimer("bake", 60.0)]),
        (60, ["timer bake"], "completed", [Finished("completed", "")]),
        (60, ["timer hold:1"], "baking", []),
        (60, ["failed health check failing on h2"], "reverting",
         [Send("revert", keys("h2")), StartTimer("revert:0", 120.0)]),
    ],
)  # fmt: skip
def test_bake_after_the_last_batch_completes_on_its_timer_or_compensates_on_failure(
    bake: float, events: list[str], phase: str, last: list[Action]
) -> None:
    d, every = run(prepared("h1 | h2", bake=bake), "commit h1 ok", "commit h2 ok", *events)
    assert d.phase == phase
    assert every[-1] == last
    if phase == "reverting":
        assert d.revert_steps == (keys("h2"), keys("h1"))
        assert d.reason == "health check failing on h2"


def test_failure_while_baking_compensates_all_committed_then_rolls_back() -> None:
    d = prepared("h1:db h1:web | h2:db h2:web", bake=60)
    d, _ = feed(d, *words("commit", "h1:db h1:web h2:db h2:web", "ok"))
    assert d.phase == "baking"
    d, every = run(d, "failed alert", *words("revert", "h2:web h2:db h1:web h1:db", "ok"))
    assert [a.keys for a in sends(flat(every), "revert")] == [
        keys("h2:web"), keys("h2:db"), keys("h1:web"), keys("h1:db"),
    ]  # fmt: skip
    assert sends(flat(every), "abort") == []
    assert d.phase == "rolled_back"
    assert set(phases(d).values()) == {"reverted"}


def test_failure_reported_while_committing_waits_for_the_batch_then_compensates() -> None:
    d = prepared("h1 h2 | h3")
    d, actions = step(d, Failed("crash loop on h1", "crash_loop"))
    assert (d.phase, d.failing, actions) == ("committing", True, [])
    d, actions = feed(d, "commit h1 ok")
    assert actions == []
    d, actions = feed(d, "commit h2 fail unhealthy")
    assert d.phase == "reverting"
    assert actions == [
        Send("abort", keys("h3")),
        Send("revert", keys("h1 h2")),
        StartTimer("revert:0", 120.0),
    ]
    assert (d.reason, d.cause) == ("crash loop on h1", "crash_loop")


@pytest.mark.parametrize(
    ("strategy", "history", "event", "cause"),
    [
        ({}, ["commit h1 fail unhealthy"], None, "health"),
        ({}, ["timer commit:0"], None, "health"),
        ({"bake": 60}, ["commit h1 ok", "commit h2 ok"], Failed("alert", "alert"), "alert"),
        ({"bake": 60}, ["commit h1 ok", "commit h2 ok"], Failed("loop", "crash_loop"),
         "crash_loop"),
        ({"canary": 1, "canary_bake": 5}, ["commit h1 ok"], Failed("probe"), "health"),
    ],
)  # fmt: skip
def test_compensation_records_its_trigger_as_cause(
    strategy: dict[str, Any], history: list[str], event: Event | None, cause: str
) -> None:
    d, _ = feed(prepared("h1 | h2", **strategy), *history)
    if event is not None:
        d, _ = step(d, event)
    assert d.phase == "reverting"
    assert d.cause == cause
    assert from_dict(json.loads(json.dumps(to_dict(d)))).cause == cause


# --- idempotency (I5) ----------------------------------------------------------------

AFTER_FIRST_COMMIT = ["started", "yes h1", "yes h2", "yes h3", "commit h1 ok"]
REVERTING = ["started", "yes h1", "yes h2", "yes h3", "commit h1 ok", "commit h2 fail x"]


@pytest.mark.parametrize(
    ("history", "repeat"),
    [
        (["started", "yes h1"], "yes h1"),
        (["started", "yes h1"], "no h1 changed my mind"),
        (["started", "no h1 full"], "no h1 full"),
        (["started", "no h1 full"], "yes h2"),
        (["started", "yes h1", "yes h2", "yes h3"], "yes h3"),
        (["started", "yes h1", "yes h2", "yes h3"], "no h2 late"),
        (["started", "yes h1", "yes h2", "timer prepare"], "yes h3"),
        (AFTER_FIRST_COMMIT, "commit h1 ok"),
        (AFTER_FIRST_COMMIT, "commit h1 fail late"),
        (AFTER_FIRST_COMMIT, "commit h3 ok"),
        (AFTER_FIRST_COMMIT, "revert h1 ok"),
        (AFTER_FIRST_COMMIT, "abort h2 ok"),
        (AFTER_FIRST_COMMIT, "commit nobody ok"),
        (AFTER_FIRST_COMMIT, "yes nobody"),
        (AFTER_FIRST_COMMIT, "timer prepare"),
        (AFTER_FIRST_COMMIT, "timer commit:0"),
        (AFTER_FIRST_COMMIT, "timer hold:1"),
        (AFTER_FIRST_COMMIT, "timer bake"),
        (AFTER_FIRST_COMMIT, "timer abort"),
        (AFTER_FIRST_COMMIT, "timer revert:0"),
        ([*AFTER_FIRST_COMMIT, "commit h2 ok"], "timer commit:1"),
        (REVERTING, "commit h2 fail x"),
        (REVERTING, "commit h2 ok"),
        (REVERTING, "timer commit:1"),
        (REVERTING, "failed again"),
        ([*AFTER_FIRST_COMMIT, "failed first"], "failed second"),
        ([*REVERTING, "revert h2 ok"], "revert h2 ok"),
        ([*REVERTING, "revert h2 ok"], "timer revert:0"),
        (["started", "no h1 full", "abort h1 ok"], "abort h1 ok"),
        (["started", "no h1 full"], "timer prepare"),
        (["started", "yes h1"], "failed too early"),
    ],
)
def test_duplicate_late_and_stale_events_change_nothing(history: list[str], repeat: str) -> None:
    d, _ = feed(make("h1 | h2 | h3"), *history)
    after, actions = step(d, ev(repeat))
    assert after == d
    assert actions == []


@pytest.mark.parametrize(
    "history",
    [
        ["started"],
        ["started", "no h1 full", "timer abort"],
        ["started", "timer prepare", "abort h1 ok", "abort h2 ok"],
        ["started", "yes h1", "yes h2", "commit h1 ok", "commit h2 ok"],
        ["started", "yes h1", "yes h2", "commit h1 ok", "commit h2 fail x", "revert h2 ok",
         "revert h1 ok"],
        ["started", "yes h1", "yes h2", "commit h1 ok", "commit h2 fail x", "revert h2 ok",
         "timer revert:1"],
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "event",
    [
        "started", "recovered", "yes h1", "no h2 x", "commit h1 ok", "commit h2 fail x",
        "revert h1 ok", "abort h1 ok", "timer prepare", "timer commit:0", "timer revert:0",
        "timer abort", "timer bake", "timer hold:1", "failed alert",
    ],
)  # fmt: skip
def test_any_event_after_a_terminal_phase_changes_nothing(history: list[str], event: str) -> None:
    layout = "" if history == ["started"] else "h1 | h2"
    d, _ = feed(make(layout), *history)
    assert d.phase in TERMINAL
    after, actions = step(d, ev(event))
    assert after == d
    assert actions == []


# --- recovery after a coordinator restart ---------------------------------------------


@pytest.mark.parametrize(
    ("history", "phase", "expected"),
    [
        ([], "aborting", [Send("abort", keys("h1 h2 h3")), StartTimer("abort", ABORT_WAIT)]),
        (["started"], "aborting", [Send("abort", keys("h1 h2 h3")), StartTimer("abort", ABORT_WAIT)]),
        (
            ["started", "yes h1", "yes h2"],
            "aborting",
            [Send("abort", keys("h1 h2 h3")), StartTimer("abort", ABORT_WAIT)],
        ),
        (
            ["started", "no h1 x", "abort h2 ok"],
            "aborting",
            [Send("abort", keys("h1 h3")), StartTimer("abort", ABORT_WAIT)],
        ),
        (
            ["started", *words("yes", "h1 h2 h3")],
            "committing",
            [Send("commit", keys("h1 h2")), StartTimer("commit:0", 120.0)],
        ),
        (
            ["started", *words("yes", "h1 h2 h3"), "commit h2 ok"],
            "committing",
            [Send("commit", keys("h1")), StartTimer("commit:0", 120.0)],
        ),
        (
            ["started", *words("yes", "h1 h2 h3"), "commit h2 ok", "commit h1 ok"],
            "committing",
            [Send("commit", keys("h3")), StartTimer("commit:1", 120.0)],
        ),
        (
            ["started", *words("yes", "h1 h2 h3"), "commit h2 ok", "commit h1 fail x"],
            "reverting",
            [Send("abort", keys("h3")), Send("revert", keys("h1 h2")), StartTimer("revert:0", 120.0)],
        ),
        (
            ["started", *words("yes", "h1 h2 h3"), "commit h2 ok", "commit h1 fail x",
             "revert h2 ok"],
            "reverting",
            [Send("abort", keys("h3")), Send("revert", keys("h1")), StartTimer("revert:0", 120.0)],
        ),
    ],
)  # fmt: skip
def test_recovered_presumes_abort_before_a_decision_and_re_drives_it_after(
    history: list[str], phase: str, expected: list[Action]
) -> None:
    d, _ = feed(make("h1 h2 | h3"), *history)
    after, actions = step(d, Recovered())
    assert after.phase == phase
    assert actions == expected
    if d.decision is None:
        assert after.decision == "abort"
        assert "presumed abort" in after.reason
    else:
        assert (after.decision, after.phase) == (d.decision, d.phase)
    if after.decision == "abort":
        assert sends(actions, "commit") == []


@pytest.mark.parametrize(
    ("strategy", "history", "expected"),
    [
        ({"canary": 1, "canary_bake": 9}, ["commit h1 ok"], [StartTimer("hold:1", 9.0)]),
        ({"bake": 60}, ["commit h1 ok", "commit h2 ok"], [StartTimer("bake", 60.0)]),
    ],
)
def test_recovered_restarts_the_hold_and_bake_timers(
    strategy: dict[str, Any], history: list[str], expected: list[Action]
) -> None:
    d, _ = feed(prepared("h1 | h2", **strategy), *history)
    after, actions = step(d, Recovered())
    assert after == d
    assert actions == expected


def test_recovered_twice_sends_the_same_thing_and_changes_nothing() -> None:
    d, _ = feed(prepared("h1 h2 | h3"), "commit h2 ok")
    once, first = step(d, Recovered())
    twice, second = step(once, Recovered())
    assert once == twice == d
    assert first == second


def test_recovered_while_reverting_re_sends_abort_to_participants_never_committed() -> None:
    d = prepared("h1 | h2 | h3")
    d, actions = feed(d, "commit h1 ok", "commit h2 fail unhealthy")
    assert Send("abort", keys("h3")) in actions  # persisted, then the coordinator dies
    _, actions = step(d, Recovered())
    assert keys("h3")[0] in sent_to(actions, "abort")


def test_prepare_timeout_with_every_host_silent_sends_abort_to_them() -> None:
    d, _ = feed(make("h1 h2", allow_unavailable=5), "started")
    after, actions = step(d, TimedOut("prepare"))
    assert after.phase in ("aborting", "aborted")
    assert sorted(sent_to(actions, "abort")) == list(keys("h1 h2"))


# --- persistence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "strategy", "events"),
    [
        ("", {}, []),
        ("h1 h2:api | h3", {}, []),
        ("h1 h2:api | h3", {}, ["started", "yes h1"]),
        ("h1 h2:api | h3", {"allow_unavailable": 1}, ["started", "yes h1", "yes h2:api",
                                                      "timer prepare"]),
        ("h1 h2:api | h3", {}, ["started", "no h3 disk full"]),
        ("h1 | h2 | h3", {"canary": 1, "canary_bake": "5s"}, ["started", *words("yes", "h1 h2 h3"),
                                                              "commit h1 ok"]),
        ("h1 | h2 | h3", {"max_parallel": "50%"}, ["started", *words("yes", "h1 h2 h3"),
                                                   "commit h1 ok", "commit h2 fail x"]),
        ("h1 | h2", {"bake": "1m"}, ["started", "yes h1", "yes h2", "commit h1 ok",
                                     "commit h2 ok"]),
        ("h1 | h2", {}, ["started", "yes h1", "yes h2", "commit h1 ok", "commit h2 fail x",
                         "revert h2 fail y", "revert h1 ok"]),
    ],
)  # fmt: skip
def test_to_dict_from_dict_round_trips_through_json_at_every_point_of_a_run(
    layout: str, strategy: dict[str, Any], events: list[str]
) -> None:
    d = make(layout, **strategy)
    for text in ["", *events]:
        if text:
            d, _ = step(d, ev(text))
        assert from_dict(to_dict(d)) == d
        assert from_dict(json.loads(json.dumps(to_dict(d)))) == d


def test_a_run_resumed_from_its_stored_form_behaves_like_the_original() -> None:
    events = ["started", "yes h1", "yes h2", "commit h1 ok", "commit h2 fail x", "revert h2 ok"]
    direct, _ = feed(make("h1 | h2"), *events)
    d = make("h1 | h2")
    for text in events:
        d, _ = step(from_dict(json.loads(json.dumps(to_dict(d)))), ev(text))
    assert d == direct


# --- property: safety of every run ------------------------------------------------------

TOKENS = ("prepare", "abort", "bake", "hold:1", "commit:0", "commit:1", "commit:2",
          "commit:3", "revert:0", "revert:1", "revert:2", "revert:3")  # fmt: skip
"""Every token the machine can start for the deployments drawn below."""


@dataclass
class Trace:
    """What a run sent, and to whom, checked after every step."""

    voted_yes: set[Key] = field(default_factory=set)
    committed_to: set[Key] = field(default_factory=set)
    reverted_to: set[Key] = field(default_factory=set)


def _check_step(before: Deployment, event: Event, after: Deployment, actions: list[Action],
                trace: Trace) -> None:  # fmt: skip
    voter = before.participants.get(event.key) if isinstance(event, Voted) else None
    if isinstance(event, Voted) and event.yes and voter and voter.phase == "preparing":
        trace.voted_yes.add(event.key)
    for send in sends(actions):
        if send.command == "commit":
            assert after.decision == "commit", "commit sent before the decision"
            assert set(send.keys) <= trace.voted_yes, "commit to a host that did not vote yes"
            assert all(after.participants[k].phase != "unavailable" for k in send.keys)
            trace.committed_to.update(send.keys)
        if send.command == "revert":
            assert set(send.keys) <= trace.committed_to, "revert of a host never committed"
            trace.reverted_to.update(send.keys)
    if before.done:
        assert (after, actions) == (before, [])


def _check_end(d: Deployment, trace: Trace) -> None:
    states = {k: p.phase for k, p in d.participants.items()}
    if d.phase == "completed":
        assert all(s in ("committed", "unavailable") for s in states.values()), states
        assert trace.committed_to == {k for k, s in states.items() if s == "committed"}
    if d.phase == "rolled_back":
        assert not [k for k, s in states.items() if s in
                    ("committed", "committing", "commit_failed", "reverting")], states  # fmt: skip
        assert trace.committed_to <= trace.reverted_to
    if d.phase == "aborted":
        assert trace.committed_to == set()
        assert d.decision == "abort"
    if d.phase == "failed":
        assert "revert_failed" in states.values()


def _apply(d: Deployment, event: Event, trace: Trace) -> Deployment:
    after, actions = step(d, event)
    _check_step(d, event, after, actions, trace)
    return after


@st.composite
def deployments(draw: st.DrawFn) -> Deployment:
    """1-5 hosts running 1-2 services, in 1-4 batches, with a random strategy."""
    hosts = [f"h{i}" for i in range(1, draw(st.integers(1, 5)) + 1)]
    services = draw(st.sampled_from([["web"], ["db", "web"], ["api"]]))
    batches: list[str] = []
    while hosts:
        size = draw(st.integers(1, 3))
        batches.append(" ".join(f"{h}:{s}" for h in hosts[:size] for s in services))
        hosts = hosts[size:]
    return make(
        " | ".join(batches),
        allow_unavailable=draw(st.integers(0, 2)),
        canary=draw(st.integers(0, 1)),
        canary_bake=draw(st.sampled_from([0, 5])),
        bake=draw(st.sampled_from([0, 60])),
    )


@st.composite
def events_for(draw: st.DrawFn, d: Deployment) -> list[str]:
    """Random events for `d`: votes from most participants, then anything, some replayed.

    Votes are mostly YES and results mostly ok, so runs reach the commit, hold, bake
    and revert paths, not only aborts.
    """
    names = [f"{h}:{s}" for h, s in d.participants]
    votes = [
        f"yes {n}" if draw(st.integers(0, 9)) else f"no {n} x"
        for n in draw(st.permutations(names))
        if draw(st.integers(0, 9))
    ]
    one = st.one_of(
        st.builds(lambda n, y: f"yes {n}" if y else f"no {n} x",
                  st.sampled_from(names), st.integers(0, 9).map(bool)),
        st.builds(lambda c, n, ok: f"{c} {n} {'ok' if ok else 'fail x'}",
                  st.sampled_from(["commit", "commit", "commit", "revert", "abort"]),
                  st.sampled_from(names), st.integers(0, 5).map(bool)),
        st.sampled_from(TOKENS).map(lambda t: f"timer {t}"),
        st.sampled_from(["failed alert", "recovered"]),
    )  # fmt: skip
    events = [*votes, *draw(st.lists(one, max_size=40))]
    cut = draw(st.integers(0, len(events)))
    again = draw(st.lists(st.sampled_from(events), max_size=8)) if events else []
    return [*events[:cut], *again, *events[cut:]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_events_never_commit_without_decision_or_yes_vote_and_ends_are_consistent(
    data: st.DataObject,
) -> None:
    d = data.draw(deployments())
    trace = Trace()
    for text in ["started", *data.draw(events_for(d))]:
        d = _apply(d, ev(text), trace)
        assert from_dict(json.loads(json.dumps(to_dict(d)))) == d
    for _ in range(300):  # then answer what it waits for until it ends
        if d.done:
            break
        d = _apply(d, _answer(d, data), trace)
    assert d.done
    _check_end(d, trace)


def _answer(d: Deployment, data: st.DataObject) -> Event:
    """Something the deployment waits for: mostly good answers, sometimes a failure."""
    roll = data.draw(st.integers(0, 99))
    timer = {
        "preparing": "prepare",
        "aborting": "abort",
        "committing": f"commit:{d.step_index}",
        "reverting": f"revert:{d.revert_index}",
        "holding": f"hold:{d.step_index}",
        "baking": "bake",
    }[d.phase]
    if d.phase in ("holding", "baking"):
        return Failed("alert") if roll < 10 else TimedOut(timer)
    pending = d.in_phase(d.phase)  # participants wait in the phase of the same name
    if roll < 4 or not pending:
        return TimedOut(timer)
    waiting = data.draw(st.sampled_from(pending))
    if d.phase == "preparing":
        return Voted(waiting, roll >= 8, "x")
    if d.phase == "aborting":
        return StepDone(waiting, "abort", True)
    return StepDone(waiting, "commit" if d.phase == "committing" else "revert", roll >= 8, "x")


def _noise(data: st.DataObject, history: list[Event]) -> Event:
    """A duplicate of an earlier event, a stale or current timer, a failure or a restart."""
    if data.draw(st.booleans()) and history:
        return data.draw(st.sampled_from(history))
    choices: list[Event] = [*(TimedOut(t) for t in TOKENS), Failed("alert"), Recovered()]
    return data.draw(st.sampled_from(choices))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deployments(), st.data())
def test_runs_with_duplicates_and_stale_timers_always_end_consistent(
    d: Deployment, data: st.DataObject
) -> None:
    """Answer what the deployment waits for, mixed with noise, until it ends."""
    trace = Trace()
    history: list[Event] = []
    noise = data.draw(st.integers(0, 20), label="noise budget")
    d = _apply(d, Started(), trace)
    for _ in range(300):
        if d.done:
            break
        noisy = noise > 0 and data.draw(st.integers(0, 4)) == 0
        noise -= noisy
        event = _noise(data, history) if noisy else _answer(d, data)
        history.append(event)
        d = _apply(d, event, trace)
    assert d.done
    _check_end(d, trace)
    for event in history:  # everything again, after the end: nothing changes
        assert step(d, event) == (d, [])


# --- operator control (issue 4): pause, resume, abort ----------------------------------


def test_pause_stops_further_batches_and_resume_sends_the_next() -> None:
    d = prepared("h1 | h2 | h3")
    d, actions = feed(d, "pause", "commit h1 ok")
    assert d.phase == "paused"
    assert sends(actions) == []
    d, actions = feed(d, "resume")
    assert d.phase == "committing"
    assert sent_to(actions, "commit") == list(keys("h2"))


def test_pause_during_a_canary_hold_waits_for_resume_after_the_hold() -> None:
    d = prepared("h1 | h2", canary=1, canary_bake=5)
    d, _ = feed(d, "commit h1 ok", "pause", "timer hold:1")
    assert d.phase == "paused"
    d, actions = feed(d, "resume")
    assert sent_to(actions, "commit") == list(keys("h2"))


@pytest.mark.parametrize(
    ("history", "phase", "reverted", "aborted"),
    [
        (["started", "yes h1"], "aborting", "", "h1 h2"),
        (["started", "yes h1", "yes h2", "pause", "commit h1 ok"], "reverting", "h1", "h2"),
    ],
)
def test_operator_abort_returns_every_participant_to_the_starting_release(
    history: list[str], phase: str, reverted: str, aborted: str
) -> None:
    d, _ = feed(make("h1 | h2"), *history)
    after, actions = step(d, Control("abort"))
    assert after.phase == phase
    assert sent_to(actions, "revert") == list(keys(reverted))
    assert sorted(sent_to(actions, "abort")) == sorted(keys(aborted))
    assert "operator" in after.reason


def test_operator_abort_while_committing_waits_for_the_batch_then_compensates() -> None:
    d = prepared("h1 h2 | h3")
    d, actions = feed(d, "abort!", "commit h1 ok")
    assert sends(actions) == []
    d, actions = feed(d, "commit h2 ok")
    assert d.phase == "reverting"
    assert sorted(sent_to(actions, "revert")) == sorted(keys("h1 h2"))


def test_hosts_left_out_as_unavailable_are_told_to_abort_what_they_staged() -> None:
    d, _ = feed(make("h1 h2", allow_unavailable=1), "started", "yes h1")
    after, actions = step(d, TimedOut("prepare"))
    assert after.phase == "committing"
    assert sent_to(actions, "abort") == list(keys("h2"))
    assert sent_to(actions, "commit") == list(keys("h1"))


def test_pause_during_prepare_holds_even_the_first_batch() -> None:
    d, _ = feed(make("h1 | h2"), "started", "pause", "yes h1")
    after, actions = step(d, ev("yes h2"))
    assert (after.decision, after.phase) == ("commit", "paused")
    assert sends(actions) == []
    after, actions = step(after, Control("resume"))
    assert sent_to(actions, "commit") == list(keys("h1"))


# --- answering an agent in doubt (issue 5) -------------------------------------------

from coordinator.triggers import on_inquiry  # noqa: E402


@pytest.mark.parametrize(
    ("history", "asker", "answer"),
    [
        (["started", "yes h1"], "h1", None),  # undecided: the decision will come
        (["started", "yes h1"], "h2", None),  # its vote not counted yet: it may be on its way
        (["started", "yes h1", "no h2 disk"], "h2", "abort"),
        (["started", "yes h1", "yes h2"], "h1", "commit"),  # its commit was sent
        (["started", "yes h1", "yes h2"], "h2", None),  # decided, its batch not come yet
        (["started", "yes h1", "yes h2", "commit h1 ok"], "h1", "commit"),
        (["started", "yes h1", "no h2 disk"], "h1", "abort"),
        (["started", "yes h1", "yes h2", "commit h1 fail x", "revert h1 ok"], "h2", "abort"),
        (["started", "yes h1", "yes h2", "commit h1 fail x", "revert h1 fail y"], "h2", "abort"),
        (["started", "yes h1", "yes h2", "commit h1 ok", "commit h2 ok"], "h2", "commit"),
    ],
)
def test_agent_in_doubt_is_told_to_commit_only_what_it_was_sent_and_never_an_abandoned_version(
    history: list[str], asker: str, answer: str | None
) -> None:
    d, _ = feed(make("h1 | h2"), *history)
    assert on_inquiry(d, key(asker)) == answer


def test_agent_in_doubt_about_an_unknown_deployment_is_told_to_abort() -> None:
    assert on_inquiry(None, key("h1")) == "abort"


def test_a_vote_for_another_version_than_the_participants_changes_nothing() -> None:
    """Issue 8: a report about a version the host was not asked to prepare is no vote."""
    d, _ = feed(make("h1 h2"), "started")
    for vote in (Voted(key("h1"), True, "", "9.9.9"), Voted(key("h1"), False, "x", "1.0.0")):
        after, actions = step(d, vote)
        assert (after, actions) == (d, [])
    after, _ = step(d, Voted(key("h1"), True, "", "2.0.0"))
    assert after.participants[key("h1")].phase == "prepared"


# --- prepare flow control (issue 9): max_parallel_prepare -----------------------------


def in_flight(d: Deployment) -> list[Key]:
    return [k for k, p in d.participants.items() if p.phase == "preparing"]


def timers(actions: list[Action]) -> list[str]:
    return [a.token for a in actions if isinstance(a, StartTimer)]


def test_started_sends_prepare_to_the_first_max_parallel_prepare_in_plan_order() -> None:
    d = make("h1 h2 | h3 h4 h5", max_parallel_prepare=2, prepare_timeout=7)
    after, actions = step(d, Started())
    assert actions == [Send("prepare", keys("h1 h2")), StartTimer("prepare", 7.0)]
    assert phases(after) == {
        "h1": "preparing", "h2": "preparing", "h3": "queued", "h4": "queued", "h5": "queued",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "participants", "at_once"),
    [
        ("100%", 5, 5),
        (5, 5, 5),
        (9, 5, 5),
        (1, 5, 1),
        ("40%", 5, 2),
        ("50%", 3, 1),
        ("10%", 3, 1),  # at least one
    ],
)
def test_max_parallel_prepare_is_a_count_or_a_share_of_the_participants(
    limit: int | str, participants: int, at_once: int
) -> None:
    d = make(" ".join(f"h{i}" for i in range(participants)), max_parallel_prepare=limit)
    _, actions = step(d, Started())
    assert len(sent_to(actions, "prepare")) == at_once


@pytest.mark.parametrize("value", [0, -1, "0", "0%", "101%", "half", "5.5"])
def test_max_parallel_prepare_refuses_what_is_no_count_or_percentage(value: int | str) -> None:
    with pytest.raises(ValueError, match="max_parallel_prepare"):
        Strategy(max_parallel_prepare=value)


def test_each_yes_vote_sends_the_next_prepare_and_a_full_wave_starts_its_timer() -> None:
    d, _ = feed(make("h1 h2 | h3 h4 h5", max_parallel_prepare=2, prepare_timeout=7), "started")
    d, every = run(d, "yes h2", "yes h1", "yes h3", "yes h4", "yes h5")
    assert [sent_to(a, "prepare") for a in every] == [
        list(keys("h3")), list(keys("h4")), list(keys("h5")), [], [],
    ]  # fmt: skip
    assert [timers(a) for a in every] == [
        [], ["prepare:1"], ["prepare:2"], [], ["commit:0"],
    ]  # fmt: skip
    assert StartTimer("prepare:1", 7.0) in every[1]
    assert sent_to(every[-1], "commit") == list(keys("h1 h2"))
    assert d.decision == "commit"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_never_more_prepares_in_flight_than_allowed_and_each_sent_once_in_plan_order(
    data: st.DataObject,
) -> None:
    hosts = data.draw(st.integers(1, 9))
    limit = data.draw(st.sampled_from([1, 2, 3, "50%", "100%"]))
    cut = data.draw(st.integers(1, hosts))
    names = [f"h{i}" for i in range(hosts)]
    d = make(f"{' '.join(names[:cut])} | {' '.join(names[cut:])}", max_parallel_prepare=limit)
    size = d.strategy.prepare_size(hosts)
    d, actions = step(d, Started())
    sent = sent_to(actions, "prepare")
    while d.phase == "preparing":
        assert 0 < len(in_flight(d)) <= size
        assert len(in_flight(d)) == size or "queued" not in phases(d).values()
        d, actions = step(d, Voted(data.draw(st.sampled_from(in_flight(d))), True))
        sent += sent_to(actions, "prepare")
    assert sent == d.plan_order()
    assert d.phase == "committing"


def test_each_wave_times_out_on_its_own_and_a_silent_host_left_out_frees_its_slot() -> None:
    d = make("h1 h2 | h3 h4", max_parallel_prepare=2, allow_unavailable=1)
    d, _ = feed(d, "started", "yes h1")
    assert phases(d)["h3"] == "preparing"  # h1's slot; wave 1 (h3 h4) not all sent yet
    d, actions = feed(d, "timer prepare")
    assert phases(d)["h2"] == "unavailable"
    assert sent_to(actions, "prepare") == list(keys("h4"))
    assert timers(actions) == ["prepare:1"]
    d, actions = feed(d, "yes h3", "yes h4")
    assert sent_to(actions, "commit") == list(keys("h1"))
    assert sent_to(actions, "abort") == list(keys("h2"))


def test_silent_hosts_beyond_allow_unavailable_are_counted_over_every_wave() -> None:
    d = make("h1 h2 h3", max_parallel_prepare=1, allow_unavailable=1)
    d, every = run(d, "started", "timer prepare", "timer prepare:1")
    assert [sent_to(a, "prepare") for a in every] == [list(keys("h1")), list(keys("h2")), []]
    assert d.phase == "aborting"
    assert d.reason == "prepare timed out: no vote from h2"
    assert sorted(sent_to(every[-1], "abort")) == list(keys("h1 h2"))
    assert phases(d)["h3"] == "aborted"  # never sent anything


@pytest.mark.parametrize(
    ("history", "token"),
    [
        (["yes h1", "yes h2"], "prepare"),  # wave 0 all voted
        (["yes h1"], "prepare:1"),  # wave 1 (h3 h4) half sent: its timer never started
        (["yes h1"], "prepare:7"),  # no such wave
        (["yes h1"], "prepare:x"),  # no prepare timer at all
    ],
)
def test_a_prepare_timer_of_a_wave_with_no_silent_member_sent_changes_nothing(
    history: list[str], token: str
) -> None:
    d, _ = feed(make("h1 h2 | h3 h4", max_parallel_prepare=2), "started", *history)
    after, actions = step(d, TimedOut(token))
    assert (after, actions) == (d, [])


@pytest.mark.parametrize(
    ("events", "aborted_to"),
    [
        (["started", "yes h1", "no h2 disk full"], "h1 h2 h3"),
        (["started", "abort!"], "h1 h2"),
        (["started", "yes h1", "recovered"], "h1 h2 h3"),
    ],
)
def test_abort_goes_to_those_sent_a_prepare_and_the_queued_end_aborted_untold(
    events: list[str], aborted_to: str
) -> None:
    d, every = run(make("h1 h2 | h3 h4 h5", max_parallel_prepare=2), *events)
    assert d.decision == "abort"
    assert sorted(sent_to(every[-1], "abort")) == sorted(keys(aborted_to))
    queued = [k for k in d.plan_order() if k not in keys(aborted_to)]
    assert all(d.participants[k].phase == "aborted" for k in queued)
    d, _ = feed(d, *words("abort", aborted_to, "ok"))
    assert d.phase == "aborted"


def test_a_vote_from_a_queued_participant_is_no_vote() -> None:
    d, _ = feed(make("h1 h2", max_parallel_prepare=1), "started")
    assert step(d, ev("yes h2")) == (d, [])


def test_a_second_started_sends_nothing_again() -> None:
    d, _ = feed(make("h1 h2 h3", max_parallel_prepare=1), "started", "yes h1")
    assert step(d, Started()) == (d, [])


def test_flow_controlled_prepare_round_trips_through_its_stored_form() -> None:
    d = make("h1 h2 | h3", max_parallel_prepare="50%")
    for text in ["started", "yes h1", "timer prepare", "yes h3"]:
        d, _ = step(from_dict(json.loads(json.dumps(to_dict(d)))), ev(text))
        assert from_dict(json.loads(json.dumps(to_dict(d)))) == d
    assert d.strategy.max_parallel_prepare == "50%"
