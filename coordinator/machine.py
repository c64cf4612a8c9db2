"""The deployment state machine: `step(deployment, event) -> (deployment, actions)`.

Pure: no I/O, no await, no clock. The coordinator loop (coordinator/service.py)
persists the returned deployment, then performs the actions, then feeds back what
happens as events. Because the loop persists before it acts, the COMMIT decision is
durable before any commit is sent (SPEC 6.1 step 3).

Phases: preparing -> committing -> (holding between batches) -> baking -> completed;
any NO vote or a silent host beyond `allow_unavailable` -> aborting -> aborted; a failed
commit (or a failure while baking) -> reverting -> rolled_back, or failed when a
revert fails. Late and duplicate events are ignored, so a message delivered twice
has its effect once (I5).

Prepare flow control (`max_parallel_prepare`): see coordinator/waves.py.
"""

from __future__ import annotations

from dataclasses import replace

from coordinator import waves
from coordinator.compensation import after_revert_result, compensate
from coordinator.deployment import (  # the machine's vocabulary, re-exported for its callers
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
    Phase,
    PPhase,
    Recovered,
    Send,
    Started,
    StartTimer,
    StepDone,
    TimedOut,
    Voted,
    finish,
    from_dict,
    new,
    queued,
    to_dict,
)  # fmt: skip

__all__ = [
    "ABORT_WAIT", "TERMINAL", "Action", "Control", "Deployment", "Event", "Failed",
    "Finished", "Key", "PPhase", "Participant", "Phase", "Recovered", "Send", "StartTimer",
    "Started", "StepDone", "TimedOut", "Voted", "from_dict", "new", "queued", "step", "to_dict",
]  # fmt: skip


def step(d: Deployment, event: Event) -> tuple[Deployment, list[Action]]:
    """The deployment after `event`, and what the loop must do next."""
    if d.done:
        return d, []
    if d.phase == "queued":
        return _while_queued(d, event)
    match event:
        case Started():
            return _start(d)
        case Voted():
            return _voted(d, event)
        case StepDone():
            return _step_done(d, event)
        case TimedOut():
            return _timed_out(d, event.timer)
        case Failed():
            return _failed(d, event)
        case Recovered():
            return _recovered(d)
        case Control():
            return _control(d, event.action)


def _failed(d: Deployment, e: Failed) -> tuple[Deployment, list[Action]]:
    """A committed participant failed: compensate, after the batch in flight if any."""
    if d.phase == "committing":
        if d.failing:
            return d, []
        return replace(d, failing=True, reason=e.reason, cause=e.cause), []
    if d.phase in ("baking", "holding", "paused"):
        return compensate(replace(d, failing=True, cause=e.cause), e.reason)
    return d, []


def _while_queued(d: Deployment, event: Event) -> tuple[Deployment, list[Action]]:
    if event == Control("abort"):
        return finish(d, "aborted", "cancelled by an operator before it started")
    return d, []


def _control(d: Deployment, action: str) -> tuple[Deployment, list[Action]]:
    if action == "pause":
        return replace(d, paused=True), []
    if action == "resume":
        d = replace(d, paused=False)
        return _send_step(d) if d.phase == "paused" else (d, [])
    reason = "aborted by an operator"
    if d.phase == "preparing":
        return _abort(d, reason)
    if d.phase == "committing":
        return (d, []) if d.failing else (replace(d, failing=True, reason=reason), [])
    if d.phase in ("holding", "paused", "baking"):
        return compensate(replace(d, failing=True), reason)
    return d, []


def _start(d: Deployment) -> tuple[Deployment, list[Action]]:
    if not d.participants:
        return finish(d, "completed", "nothing to change")
    if d.phase != "preparing" or d.count("preparing") != len(d.participants):
        return d, []  # started before: a second Started sends nothing again
    order = d.order
    size = d.strategy.prepare_size(len(order))
    if len(order) > size:
        d = d.with_participants(order[size:], phase="queued")
    first = order[:size]
    return d, [Send("prepare", tuple(first)), *waves.timers(d, 0, len(first))]


def _voted(d: Deployment, e: Voted) -> tuple[Deployment, list[Action]]:
    p = d.participants.get(e.key)
    if d.phase != "preparing" or p is None or p.phase != "preparing":
        return d, []
    if e.version is not None and e.version != p.version:
        return d, []
    if not e.yes:
        d = d.with_participant(e.key, phase="refused", reason=e.reason)
        return _abort(d, f"{p.host} voted NO for {p.service} {p.version}: {e.reason}")
    d = d.with_participant(e.key, phase="prepared")
    return _admit(d, 1)


def _admit(d: Deployment, slots: int) -> tuple[Deployment, list[Action]]:
    """Send prepare to the next `slots` queued participants; decide once none is left.

    Queued participants are a suffix of the plan order (they are admitted in order), so
    the first of them is found by counting them.
    """
    if not d.count("queued"):
        if d.count("preparing"):
            return d, []
        return _commit_first(d)
    order = d.order
    start = len(order) - d.count("queued")
    keys = order[start : start + slots]
    d = d.with_participants(keys, phase="preparing")
    return d, [Send("prepare", tuple(keys)), *waves.timers(d, start, start + len(keys))]


def _commit_first(d: Deployment) -> tuple[Deployment, list[Action]]:
    steps = tuple(s for s in (_live(d, step) for step in d.steps) if s)
    if not steps:
        return _abort(d, "no participant is available")
    d = d.with_steps(steps, decision="commit", phase="committing", step_index=0)
    d, actions = (replace(d, phase="paused"), []) if d.paused else _send_step(d)
    left_out = tuple(d.in_phase("unavailable"))
    return d, ([Send("abort", left_out)] if left_out else []) + actions


def _live(d: Deployment, keys: tuple[Key, ...]) -> tuple[Key, ...]:
    return tuple(k for k in keys if d.participants[k].phase != "unavailable")


def _send_step(d: Deployment) -> tuple[Deployment, list[Action]]:
    keys = d.steps[d.step_index]
    d = replace(d.with_participants(keys, phase="committing"), phase="committing")
    token = f"commit:{d.step_index}"
    return d, [Send("commit", keys), StartTimer(token, d.strategy.commit_timeout)]


def _abort(d: Deployment, reason: str) -> tuple[Deployment, list[Action]]:
    """ABORT: told to those sent a prepare; the queued ones never were, so they are done."""
    keys = tuple(d.in_phase("preparing", "prepared", "refused", "unavailable"))
    d = d.with_participants(d.in_phase("queued"), phase="aborted")
    d = d.with_participants(keys, phase="aborting")
    d = replace(d, decision="abort", phase="aborting", reason=reason)
    if not keys:
        return finish(d, "aborted", reason)
    return d, [Send("abort", keys), StartTimer("abort", ABORT_WAIT)]


def _step_done(d: Deployment, e: StepDone) -> tuple[Deployment, list[Action]]:
    p = d.participants.get(e.key)
    if p is None:
        return d, []
    if e.step == "commit" and p.phase == "committing":
        d = d.with_participant(
            e.key, phase="committed" if e.ok else "commit_failed", reason=e.reason
        )
        if not e.ok and not d.failing:
            reason = f"commit failed on {p.host} for {p.service}: {e.reason}"
            d = replace(d, failing=True, reason=reason, cause="health")
        return _after_commit_result(d)
    if e.step == "revert" and p.phase == "reverting":
        d = d.with_participant(
            e.key, phase="reverted" if e.ok else "revert_failed", reason=e.reason
        )
        return after_revert_result(d)
    if e.step == "abort" and p.phase == "aborting":
        d = d.with_participant(e.key, phase="aborted")
        if d.phase == "aborting" and not d.count("aborting"):
            return finish(d, "aborted", d.reason)
    return d, []


def _after_commit_result(d: Deployment) -> tuple[Deployment, list[Action]]:
    if d.count("committing"):  # only the batch in flight can be committing
        return d, []
    if d.failing:
        return compensate(d, d.reason)
    return _next_step(d)


def _next_step(d: Deployment) -> tuple[Deployment, list[Action]]:
    if d.step_index + 1 >= len(d.steps):
        if d.strategy.bake > 0:
            return replace(d, phase="baking"), [StartTimer("bake", d.strategy.bake)]
        return finish(d, "completed", "")
    d = replace(d, step_index=d.step_index + 1)
    if d.step_index == 1 and d.strategy.canary > 0 and d.strategy.canary_bake > 0:
        return replace(d, phase="holding"), [StartTimer("hold:1", d.strategy.canary_bake)]
    if d.paused:
        return replace(d, phase="paused"), []
    return _send_step(d)


def _timed_out(d: Deployment, token: str) -> tuple[Deployment, list[Action]]:
    wave = waves.wave_of(token)
    if wave is not None and d.phase == "preparing":
        return _prepare_deadline(d, wave)
    if token == "abort" and d.phase == "aborting":
        return finish(d, "aborted", d.reason)
    if token == "bake" and d.phase == "baking":
        return finish(d, "completed", "")
    if token == f"hold:{d.step_index}" and d.phase == "holding":
        return (replace(d, phase="paused"), []) if d.paused else _send_step(d)
    if token == f"commit:{d.step_index}" and d.phase == "committing":
        silent = [k for k in d.steps[d.step_index] if d.participants[k].phase == "committing"]
        d = d.with_participants(silent, phase="commit_failed", reason="no commit result in time")
        if not d.failing:
            d = replace(d, failing=True, reason="commit timed out", cause="health")
        return compensate(d, d.reason)
    if token == f"revert:{d.revert_index}" and d.phase == "reverting":
        keys = d.revert_steps[d.revert_index]
        silent = [k for k in keys if d.participants[k].phase == "reverting"]
        d = d.with_participants(silent, phase="revert_failed", reason="no revert result in time")
        return after_revert_result(d)
    return d, []


def _prepare_deadline(d: Deployment, wave: int) -> tuple[Deployment, list[Action]]:
    """Wave `wave` had its `prepare_timeout`: its silent members are late."""
    order = d.order
    size = d.strategy.prepare_size(len(order))
    members = order[wave * size : (wave + 1) * size]
    silent = [k for k in members if d.participants[k].phase == "preparing"]
    if not silent or d.participants[members[-1]].phase == "queued":
        return d, []  # all voted, or a wave not all sent yet, whose timer never started
    hosts = sorted({h for h, _ in silent})
    late = {h for h, _ in d.in_phase("unavailable")}.union(hosts)
    if len(late) > d.strategy.allow_unavailable:
        return _abort(d, f"prepare timed out: no vote from {', '.join(hosts)}")
    d = d.with_participants(silent, phase="unavailable", reason="no vote before prepare_timeout")
    return _admit(d, len(silent))


def _recovered(d: Deployment) -> tuple[Deployment, list[Action]]:
    """After a coordinator restart: presumed abort, or re-drive the decision."""
    if d.decision is None:
        return _abort(d, "coordinator restarted before deciding (presumed abort)")
    if d.phase == "aborting":
        return d, [Send("abort", tuple(d.in_phase("aborting"))), StartTimer("abort", ABORT_WAIT)]
    if d.phase == "committing":
        keys = tuple(k for k in d.steps[d.step_index] if d.participants[k].phase == "committing")
        return d, [
            Send("commit", keys),
            StartTimer(f"commit:{d.step_index}", d.strategy.commit_timeout),
        ]
    if d.phase == "reverting":
        aborting = tuple(d.in_phase("aborting"))
        keys = tuple(
            k for k in d.revert_steps[d.revert_index] if d.participants[k].phase == "reverting"
        )
        resend: list[Action] = [Send("abort", aborting)] if aborting else []
        return d, [
            *resend,
            Send("revert", keys),
            StartTimer(f"revert:{d.revert_index}", d.strategy.commit_timeout),
        ]
    if d.phase == "holding":
        return d, [StartTimer(f"hold:{d.step_index}", d.strategy.canary_bake)]
    if d.phase == "baking":
        return d, [StartTimer("bake", d.strategy.bake)]
    return d, []
