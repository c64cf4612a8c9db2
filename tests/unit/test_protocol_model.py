"""Model test of the whole two-phase-commit protocol (issue 5), no I/O.

The real, pure coordinator machine (coordinator/machine.py) runs against a small pure
model of the agents and of the broker between them, and hypothesis explores the
interleavings (`RuleBasedStateMachine`):

- the network is a multiset of in-flight messages both ways: commands built from the
  machine's `Send` actions, and the agents' reports (votes, step results). Any message
  can be delivered (reordering) or duplicated (the broker is at-least-once: a lost
  message is a redelivered one, so nothing is dropped);
- timers are the tokens of outstanding `StartTimer`s; any of them may fire at any time
  (real time is not modelled, so "early" is just another interleaving);
- the coordinator loop persists each step, then acts: the step's messages and timers
  wait in an outbox until it acts. It may crash: it restarts from its last persisted
  state (a JSON round trip of `to_dict`), its timers lost and, when it died between
  persisting and acting, its outbox too, and is fed `Recovered()`;
- an agent may crash after doing a command's work but before its report left: the
  command stays in the network and is redelivered; a host may go down (its commands
  wait in the broker) and comes back only after the deployment ended;
- rules make a participant vote NO, fail health on commit or fail its revert; an alert
  (`Failed`) and an operator's pause, resume or abort (`Control`) can arrive at any time.

The model agent follows agent/steps.py: a transaction state per participant, commit only
from `prepared`, a replayed command answers the recorded result and does not switch again,
a revert goes back to the version it started from (a no-op when that already runs).

Invariants (SPEC 6.4) are checked after every rule, and `teardown` drives the system to
quiescence (deliver everything, fire every timer, resume a pause) with the dead hosts
still down and requires a terminal phase: no deployment is left pending forever; then
the hosts come back, work off their queues, and the outcome must still hold.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator.machine import (
    Control,
    Deployment,
    Event,
    Failed,
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

RANK = {"db": 0, "api": 1}
"""Providers rank lower: db <- api."""
SERVICES = ("db", "api")
TARGET = "2.0.0"
QUIESCENCE_LIMIT = 10_000
"""Deliveries and timer firings allowed while draining; more means a livelock."""


# --- the network --------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command to one participant (the machine's `Send` fans out per key)."""

    command: str  # prepare | commit | abort | revert
    key: Key


Message = Command | Voted | StepDone
"""Commands travel to agents; votes and step results travel to the coordinator."""


# --- the model agent ----------------------------------------------------------------


@dataclass
class Agent:
    """One participant's agent: durable transaction state and the running version."""

    version: str
    from_version: str | None
    running: str | None
    txn: str | None = None
    """None (never heard of it), prepared, no, aborted, committed, commit_failed,
    reverted, revert_failed: as agent/store.py records it."""
    reports: dict[str, StepDone] = field(default_factory=dict)
    """The recorded result of each executed commit / revert, answered on a replay."""
    switches: Counter[str] = field(default_factory=Counter)
    """How often each command kind switched the running version (I5)."""
    refuses: bool = False
    unhealthy: bool = False
    revert_breaks: bool = False

    def would_switch(self, command: str) -> bool:
        """Whether delivering `command` now would change the running version."""
        if command == "commit":
            return "commit" not in self.reports and self.txn == "prepared"
        if command == "revert":
            return (
                "revert" not in self.reports
                and not self.revert_breaks
                and self.running != self.from_version
            )
        return False

    def handle(self, key: Key, command: str) -> Message:
        match command:
            case "prepare":
                if self.txn is None:
                    self.txn = "no" if self.refuses else "prepared"
                yes = self.txn not in ("no", "aborted")
                return Voted(key, yes, "" if yes else f"transaction is {self.txn}")
            case "commit":
                return self._commit(key)
            case "abort":
                if self.txn in ("prepared", "no"):
                    self.txn = "aborted"
                return StepDone(key, "abort", True)
            case "revert":
                return self._revert(key)
        raise ValueError(command)

    def _commit(self, key: Key) -> StepDone:
        if "commit" in self.reports:
            return self.reports["commit"]
        if self.txn != "prepared":
            return StepDone(key, "commit", False, f"not prepared: transaction is {self.txn}")
        self.running = self.version
        self.switches["commit"] += 1
        self.txn = "commit_failed" if self.unhealthy else "committed"
        report = StepDone(key, "commit", not self.unhealthy, "unhealthy" * self.unhealthy)
        self.reports["commit"] = report
        return report

    def _revert(self, key: Key) -> StepDone:
        if "revert" in self.reports:
            return self.reports["revert"]
        if self.revert_breaks:
            report = StepDone(key, "revert", False, "before_rollback hook failed")
            self.txn = "revert_failed"
        else:
            if self.running != self.from_version:
                self.running = self.from_version
                self.switches["revert"] += 1
            self.txn = "reverted"
            report = StepDone(key, "revert", True)
        self.reports["revert"] = report
        return report


# --- building a random deployment ---------------------------------------------------


@st.composite
def deployments(draw: st.DrawFn) -> Deployment:
    """A small deployment: 1-3 hosts, 1-2 services, 1-3 batches, random strategy knobs
    (prepares all at once, or one or two in flight: `max_parallel_prepare`)."""
    hosts = [f"h{i}" for i in range(1, draw(st.integers(1, 3)) + 1)]
    services = SERVICES[: draw(st.integers(1, 2))]
    participants: list[Participant] = []
    for service in services:
        every = draw(st.booleans())
        chosen = hosts if every else draw(st.lists(st.sampled_from(hosts), min_size=1, unique=True))
        for host in sorted(chosen):
            old = draw(st.sampled_from(["1.0.0", "1.0.0", None]))
            participants.append(Participant(host, service, TARGET, old))
    count = draw(st.integers(1, 3))
    batches: list[list[Participant]] = [[] for _ in range(count)]
    for i, p in enumerate(draw(st.permutations(participants))):
        batches[i % count].append(p)
    strategy = Strategy(
        allow_unavailable=draw(st.integers(0, 1)),
        max_parallel_prepare=draw(st.sampled_from(["100%", "100%", 1, 2])),
        canary=draw(st.integers(0, 1)),
        canary_bake=draw(st.sampled_from([0.0, 5.0])),
        bake=draw(st.sampled_from([0.0, 60.0])),
        prepare_timeout=30.0,
        commit_timeout=120.0,
    )
    return new("d1", strategy, [b for b in batches if b], RANK)


def roundtrip(d: Deployment) -> Deployment:
    """What a restarted coordinator loads from the store."""
    return from_dict(json.loads(json.dumps(to_dict(d))))


# --- the state machine ----------------------------------------------------------------


class ProtocolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d: Deployment | None = None
        self.agents: dict[Key, Agent] = {}
        self.network: list[Message] = []
        self.timers: list[str] = []
        self.outbox: list[Message | str] = []
        """What the coordinator persisted a decision to do and has not done yet: the loop
        persists, then acts, so a crash in between loses exactly this."""
        self.dead: set[str] = set()
        """Hosts whose agent is down: their commands wait in the broker."""
        self.violations: list[str] = []
        self.voted_yes: set[Key] = set()
        """Keys whose YES vote the coordinator has received."""
        self.started_steps: set[int] = set()
        """Commit batches sent so far."""
        self.revert_failure_seen = False
        """An agent reported a failed revert, or a revert timer fired with one outstanding."""
        self.ok = False
        """False while a rule or invariant is failing: teardown must not mask the failure."""

    # -- the coordinator loop: persist (the machine's result), then act ------------------

    def drive(self, event: Event) -> None:
        """One event through the loop: act on what is still due, then step the machine;
        its actions wait in the outbox until the loop acts (or crashes)."""
        assert self.d is not None
        self.act()
        if isinstance(event, Voted) and event.yes:
            self.voted_yes.add(event.key)
        d = self.d
        if event == TimedOut(f"revert:{d.revert_index}") and d.phase == "reverting":
            self.revert_failure_seen |= any(
                d.participants[k].phase == "reverting" for k in d.revert_steps[d.revert_index]
            )
        self.d, actions = step(self.d, event)
        for action in actions:
            if isinstance(action, Send):
                for key in action.keys:
                    self._check_send(action.command, key)
                    self.outbox.append(Command(action.command, key))
            elif isinstance(action, StartTimer):
                self.outbox.append(action.token)

    def act(self) -> None:
        for item in self.outbox:
            if isinstance(item, str):
                self.timers.append(item)
            else:
                self.network.append(item)
        self.outbox.clear()

    def _check_send(self, command: str, key: Key) -> None:
        d = self.d
        assert d is not None
        if command == "revert":
            self._check_revert_order(key)
        if command != "commit":
            return
        if d.decision != "commit":
            self.violations.append(f"commit sent to {key} with decision {d.decision}")
        if key not in self.voted_yes:
            self.violations.append(f"commit sent to {key}, which never voted YES")
        if self.agents[key].txn not in ("prepared", "committed", "commit_failed"):
            self.violations.append(f"commit sent to {key}, whose agent is {self.agents[key].txn}")
        if d.paused and d.step_index > 0 and d.step_index not in self.started_steps:
            self.violations.append(f"batch {d.step_index} started while paused")
        self.started_steps.add(d.step_index)

    def _check_revert_order(self, key: Key) -> None:
        """Compensation reverts last batch first, consumers before providers (SPEC 6.3):
        nothing that must go back before `key` is still switched or reverting."""
        d = self.d
        assert d is not None
        batch = {k: i for i, keys in enumerate(d.steps) for k in keys}
        for other, p in d.participants.items():
            if other not in batch:
                continue  # unavailable: never committed
            first = batch[other] > batch[key] or (
                batch[other] == batch[key] and d.rank[other[1]] > d.rank[key[1]]
            )
            if first and p.phase in ("committing", "committed", "commit_failed", "reverting"):
                self.violations.append(f"revert sent to {key} before {other} ({p.phase})")

    def deliverable(self) -> list[int]:
        """Indexes of the messages that can be delivered: not to a dead host."""
        return [
            i for i, m in enumerate(self.network)
            if not (isinstance(m, Command) and m.key[0] in self.dead)
        ]  # fmt: skip

    def deliver_at(self, index: int) -> None:
        message = self.network.pop(index)
        if isinstance(message, Command):
            report = self.agents[message.key].handle(message.key, message.command)
            self.network.append(report)
            return
        if isinstance(message, StepDone) and message.step == "revert" and not message.ok:
            self.revert_failure_seen = True
        self.drive(message)

    # -- setup ---------------------------------------------------------------------------

    @initialize(d=deployments())
    def start(self, d: Deployment) -> None:
        self.ok = False
        self.d = d
        self.agents = {
            k: Agent(p.version, p.from_version, p.from_version) for k, p in d.participants.items()
        }
        self.drive(Started())
        self.ok = True

    # -- rules: the network ----------------------------------------------------------------

    @precondition(lambda self: self.deliverable())
    @rule(i=st.integers(0, 1000))
    def deliver(self, i: int) -> None:
        """Deliver any in-flight message: reordering."""
        self.ok = False
        ready = self.deliverable()
        self.deliver_at(ready[i % len(ready)])
        self.ok = True

    @precondition(lambda self: self.deliverable())
    @rule(picks=st.lists(st.integers(0, 1000), min_size=1, max_size=8))
    def deliver_some(self, picks: list[int]) -> None:
        """Deliver a few messages in a row, so runs get past the prepare phase."""
        self.ok = False
        for i in picks:
            ready = self.deliverable()
            if ready:
                self.deliver_at(ready[i % len(ready)])
        self.ok = True

    @precondition(lambda self: self.network)
    @rule(i=st.integers(0, 1000))
    def duplicate(self, i: int) -> None:
        """Redeliver a message (at-least-once broker, or a lost-then-redelivered one)."""
        self.ok = False
        self.network.append(self.network[i % len(self.network)])
        self.ok = True

    # -- rules: the coordinator ------------------------------------------------------------

    @precondition(lambda self: self.outbox)
    @rule()
    def coordinator_acts(self) -> None:
        self.ok = False
        self.act()
        self.ok = True

    @precondition(lambda self: self.timers)
    @rule(i=st.integers(0, 1000), now=st.integers(0, 2))
    def fire_timer(self, i: int, now: int) -> None:
        """Fire an outstanding timer (one draw in three: timers are long, messages quick)."""
        if now:
            return
        self.ok = False
        token = self.timers.pop(i % len(self.timers))
        self.drive(TimedOut(token))
        self.ok = True

    @rule(before_acting=st.booleans(), now=st.integers(0, 1))
    def crash_coordinator(self, before_acting: bool, now: int = 0) -> None:
        """Restart from the persisted state. In-process timers are gone, the broker keeps
        the messages; `before_acting`: the crash came between persisting and acting."""
        if now:
            return
        self.ok = False
        assert self.d is not None
        if before_acting:
            self.outbox.clear()
        else:
            self.act()
        self.d = roundtrip(self.d)
        self.timers.clear()
        self.drive(Recovered())
        self.ok = True

    @rule(cause=st.sampled_from(["health", "crash_loop", "alert"]))
    def alert(self, cause: Any) -> None:
        self.ok = False
        self.drive(Failed(f"{cause} reported", cause))
        self.ok = True

    @rule(action=st.sampled_from(["pause", "resume", "abort"]), now=st.integers(0, 2))
    def operator(self, action: Any, now: int) -> None:
        """An operator's pause, resume or abort (the abort one draw in three)."""
        if action == "abort" and now:
            return
        self.ok = False
        self.drive(Control(action))
        self.ok = True

    # -- rules: the agents -----------------------------------------------------------------

    @precondition(
        lambda self: any(isinstance(self.network[i], Command) for i in self.deliverable())
    )
    @rule(i=st.integers(0, 1000))
    def crash_agent(self, i: int) -> None:
        """An agent did a command's durable work and died before reporting: the broker
        redelivers the command, the report is lost."""
        self.ok = False
        commands = [m for j in self.deliverable() if isinstance(m := self.network[j], Command)]
        command = commands[i % len(commands)]
        self.agents[command.key].handle(command.key, command.command)
        self.ok = True

    @rule(i=st.integers(0, 1000), what=st.sampled_from(["refuses", "unhealthy", "revert"]))
    def break_participant(self, i: int, what: str) -> None:
        agent = list(self.agents.values())[i % len(self.agents)]
        if what == "refuses":
            agent.refuses = True
        elif what == "unhealthy":
            agent.unhealthy = True
        else:
            agent.revert_breaks = True

    @rule(i=st.integers(0, 1000), now=st.integers(0, 3))
    def host_goes_down(self, i: int, now: int) -> None:
        """A host stops consuming (its commands wait); it comes back only at the end."""
        if not now:
            hosts = sorted({h for h, _ in self.agents})
            self.dead.add(hosts[i % len(hosts)])

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def commands_are_sent_only_when_allowed(self) -> None:
        """No commit before the decision COMMIT or to a participant without a YES vote;
        no new batch while paused; no revert before those that must be reverted first."""
        assert self.violations == []

    @invariant()
    def every_command_switches_at_most_once(self) -> None:
        """I5: a duplicate or redelivered command has its effect once."""
        for key, agent in self.agents.items():
            for kind, count in agent.switches.items():
                assert count <= 1, f"{key} switched {count} times on {kind}"
            if agent.switches["revert"]:
                assert agent.switches["commit"], f"{key} reverted without a commit"

    @invariant()
    def persisted_state_is_the_state(self) -> None:
        """What the store gives back after a restart is the deployment in memory (I4)."""
        assert self.d is not None
        assert roundtrip(self.d) == self.d

    @invariant()
    def terminal_outcome_is_all_or_nothing(self) -> None:
        self.ok = False
        self.check_terminal()
        self.ok = True

    def settled(self) -> bool:
        """No message in flight or due can change a running version any more."""
        return not any(
            isinstance(m, Command) and self.agents[m.key].would_switch(m.command)
            for m in [*self.network, *self.outbox]
        )

    def check_terminal(self) -> None:
        """I2 (all-or-nothing) and I3 (truthful) once the deployment ended and settled."""
        d = self.d
        if d is None or not d.done or not self.settled():
            return
        running = {k: a.running for k, a in self.agents.items()}
        if d.phase == "completed":
            for key, p in d.participants.items():
                if p.phase == "unavailable":
                    assert running[key] == p.from_version, (key, running[key], p)
                else:
                    assert p.phase == "committed", (key, p)
                    assert running[key] == p.version, (key, running[key], p)
        elif d.phase in ("rolled_back", "aborted"):
            for key, p in d.participants.items():
                assert running[key] == p.from_version, (d.phase, key, running[key], p)
                assert p.phase not in ("committed", "committing", "commit_failed"), (key, p)
        else:
            assert d.phase == "failed"
            assert self.revert_failure_seen, f"failed without a failed revert: {d.reason}"
            assert d.in_phase("revert_failed"), d.participants
            for key, p in d.participants.items():
                if p.phase != "revert_failed":  # the operator's case: anything may run there
                    assert running[key] == p.from_version, (d.phase, key, running[key], p)

    # -- the end: no deployment pending forever --------------------------------------

    def quiesce(self) -> None:
        """Act, deliver what can be delivered, then fire timers, until nothing is left; an
        operator resumes a paused deployment (pausing is theirs to end)."""
        for _ in range(QUIESCENCE_LIMIT):
            self.act()
            ready = self.deliverable()
            if ready:
                self.deliver_at(ready[0])
            elif self.timers:
                self.drive(TimedOut(self.timers.pop(0)))
            elif self.d is not None and self.d.phase == "paused":
                self.drive(Control("resume"))
            else:
                return
        raise AssertionError("livelock: still busy after draining")

    def teardown(self) -> None:
        if not self.ok or self.d is None:
            return  # a failure is already being reported
        self.quiesce()
        assert self.d.done, f"wedged in {self.d.phase} with dead hosts {self.dead}: {self.d}"
        self.dead.clear()  # the hosts come back and work off their queues
        self.quiesce()
        assert self.violations == []
        self.every_command_switches_at_most_once()
        self.check_terminal()


ProtocolModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestProtocolModel = ProtocolModel.TestCase


# --- the model itself: a few fixed runs so the properties above are not vacuous -------


def _scripted(*, unhealthy: bool = False, crash_after_decision: bool = False) -> ProtocolModel:
    m = ProtocolModel()
    batches = [[Participant("h1", "db", TARGET, "1.0.0")], [Participant("h2", "api", TARGET, None)]]
    m.start(new("d1", Strategy(), batches, RANK))
    if unhealthy:
        m.agents[("h2", "api")].unhealthy = True
    m.act()
    while m.network:
        m.deliver_at(0)
        if crash_after_decision and m.d is not None and m.d.decision == "commit":
            crash_after_decision = False
            m.crash_coordinator(before_acting=True)
        m.act()
    m.teardown()
    return m


def phase(m: ProtocolModel) -> str:
    assert m.d is not None
    return m.d.phase


def test_model_happy_path_completes_with_everyone_on_target() -> None:
    m = _scripted()
    assert phase(m) == "completed"
    assert {a.running for a in m.agents.values()} == {TARGET}


def test_model_failed_commit_rolls_everyone_back() -> None:
    m = _scripted(unhealthy=True)
    assert phase(m) == "rolled_back"
    assert [a.running for a in m.agents.values()] == ["1.0.0", None]


def test_model_crash_after_deciding_redrives_the_commit() -> None:
    m = _scripted(crash_after_decision=True)
    assert phase(m) == "completed"
    assert {a.running for a in m.agents.values()} == {TARGET}


@pytest.mark.parametrize("phase", ["completed", "rolled_back"])
def test_model_terminal_check_catches_a_split_fleet(phase: str) -> None:
    m = _scripted(unhealthy=phase == "rolled_back")
    m.agents[("h1", "db")].running = "1.0.0" if phase == "completed" else TARGET
    with pytest.raises(AssertionError):
        m.check_terminal()
