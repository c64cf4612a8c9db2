"""Compensation: reverting a deployment's switched participants (pure, like the machine).

`coordinator.machine` calls `compensate` when a commit fails, a failure is reported
after a commit (health, crash loop, alert) or an operator aborts after the decision:
every participant that switched is reverted, last batch first and, within a batch,
consumers before providers (highest dependency rank first), one revert batch at a time.
Prepared participants that never switched are told to abort. A revert that fails (or
does not answer in time) ends the deployment `failed`; otherwise it is `rolled_back`.
"""

from __future__ import annotations

from dataclasses import replace

from coordinator.deployment import Action, Deployment, Key, Send, StartTimer, finish

SWITCHED = ("committing", "committed", "commit_failed")
"""Participant phases whose `current` may have been switched: they are reverted."""


def compensate(d: Deployment, reason: str) -> tuple[Deployment, list[Action]]:
    """Revert every participant that switched, last batch first, consumers first."""
    switched = {k for k in d.participants if d.participants[k].phase in SWITCHED}
    order: list[tuple[Key, ...]] = []
    for batch in reversed(d.steps):
        keys = [k for k in batch if k in switched]
        for rank in sorted({d.rank.get(k[1], 0) for k in keys}, reverse=True):
            order.append(tuple(k for k in keys if d.rank.get(k[1], 0) == rank))
    untouched = tuple(d.in_phase("prepared"))
    actions: list[Action] = [Send("abort", untouched)] if untouched else []
    d = d.with_participants(untouched, phase="aborting")
    d = replace(d, phase="reverting", reason=reason, revert_steps=tuple(order), revert_index=0)
    if not order:
        d, done = finish(d, "rolled_back", reason)
        return d, actions + done
    d, more = send_revert(d)
    return d, actions + more


def send_revert(d: Deployment) -> tuple[Deployment, list[Action]]:
    keys = d.revert_steps[d.revert_index]
    d = d.with_participants(keys, phase="reverting")
    token = f"revert:{d.revert_index}"
    return d, [Send("revert", keys), StartTimer(token, d.strategy.commit_timeout)]


def after_revert_result(d: Deployment) -> tuple[Deployment, list[Action]]:
    if d.count("reverting"):  # only the revert batch in flight can be reverting
        return d, []
    if d.revert_index + 1 < len(d.revert_steps):
        return send_revert(replace(d, revert_index=d.revert_index + 1))
    failed = d.in_phase("revert_failed")
    if failed:
        hosts = ", ".join(f"{h}/{s}" for h, s in failed)
        return finish(d, "failed", f"{d.reason}; revert failed on {hosts}")
    return finish(d, "rolled_back", d.reason)
