"""The four protocol steps on one host: prepare, commit, abort, revert (SPEC 6.1).

The agent service's per-service worker calls `Steps.run(command)` and publishes the
body it returns (a Vote or a StepResult). Each step first looks at the transaction's
recorded state, so running a step again after a crash or a duplicate finds the work
done and answers the same. Effects are recorded before the report is returned.

Commit and revert hold the supervisor's lock of their service, so crash handling never
restarts a service while a step switches it. File work (staging, discarding, marking,
switching `current`, GC) runs in a worker thread, never on the event loop: removing a
large release must not stall heartbeats or the other services' steps.

A prepare for a rollback reuses the kept release dir when it is intact (no download,
SPEC 6.3); the commit of such a prepare, and every revert, first runs `before_rollback`
of the release being left, in that release's dir: if it fails, the step fails and the
running version is left alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from agent import artifacts, driver
from agent.driver import ProcessRecord
from agent.releases import Releases
from agent.store import Store, Switch, SwitchKind, Txn, TxnState
from agent.supervisor import Supervisor
from shared import faults, log
from shared.config import AgentSettings
from shared.errors import PermanentError
from shared.messages import Abort, Body, Commit, Prepare, Revert, Step, StepResult, Vote
from shared.specs import ServiceVersion

Command = Prepare | Commit | Abort | Revert
PROTECTED: tuple[TxnState, ...] = ("preparing", "prepared")
T = TypeVar("T")


class Steps:
    """Executes commands against this host's services."""

    def __init__(self, supervisor: Supervisor, settings: AgentSettings) -> None:
        self.sup = supervisor
        self.store: Store = supervisor.store
        self.releases: Releases = supervisor.releases
        self.host_id = supervisor.host_id
        self.settings = settings

    async def run(self, command: Command) -> Body:
        if isinstance(command, Prepare):
            return await self.prepare(command)
        if isinstance(command, Abort):
            return await self.abort(command)
        async with self.sup.lock(command.service):
            if isinstance(command, Commit):
                return await self.commit(command)
            return await self.revert(command)

    def _logger(self, deployment_id: str | None, service: str) -> Any:
        """The step logger, bound with host, deployment and service."""
        return log.get(
            "agent.steps", host_id=self.host_id, deployment_id=deployment_id, service=service
        )

    # --- prepare ----------------------------------------------------------------

    async def prepare(self, cmd: Prepare) -> Vote:
        spec, dep = cmd.spec, cmd.deployment_id
        logger = self._logger(dep, spec.name)
        existing = await self.store.txn(dep, spec.name)
        if existing is not None and existing.state != "preparing":
            yes = existing.state not in ("no", "aborted")
            return self._vote(cmd, yes, "" if yes else f"transaction is {existing.state}")
        txn = Txn(dep, spec.name, spec.version, cmd.from_version, spec, "preparing", None,
                  rollback=cmd.rollback)  # fmt: skip
        await self.store.put_txn(txn)
        try:
            staged = await self._stage(spec, dep)
            self.sup.render(spec)  # refuses unknown ${...} before voting
        except (PermanentError, OSError) as e:
            await asyncio.to_thread(self.releases.discard, spec.name, dep)
            await self.store.put_txn(replace(txn, state="no"))
            logger.warning("prepare.voted", yes=False, reason=str(e))
            return self._vote(cmd, False, str(e))
        await self.store.put_txn(replace(txn, state="prepared", staged_path=staged))
        logger.info("prepare.voted", yes=True, version=spec.version, staged=staged is not None,
                    rollback=cmd.rollback)  # fmt: skip
        return self._vote(cmd, True, "")

    async def _stage(self, spec: ServiceVersion, deployment_id: str) -> str | None:
        """Stage the artifact unless an intact release is already here; the staged path.
        All of it in one worker thread trip."""
        limits = artifacts.Limits.of(self.settings)
        return await asyncio.to_thread(_stage_files, self.releases, spec, deployment_id, limits)

    def _vote(self, cmd: Prepare, yes: bool, reason: str) -> Vote:
        return Vote(deployment_id=cmd.deployment_id, host_id=self.host_id, service=cmd.spec.name,
                    version=cmd.spec.version, yes=yes, reason=reason)  # fmt: skip

    # --- commit -----------------------------------------------------------------

    async def commit(self, cmd: Commit) -> StepResult:
        dep, name = cmd.deployment_id, cmd.service
        logger = self._logger(dep, name)
        txn = await self.store.txn(dep, name)
        if txn is None or txn.state != "prepared":
            return await self._commit_replay(cmd, txn)
        spec = txn.spec
        resumed = await self._switched(spec, dep, "commit")
        try:
            if resumed is None:  # hooks ran already if `current` was switched before a crash
                await asyncio.to_thread(self.releases.promote, spec, dep)
                if txn.rollback:
                    await self._before_rollback(name, spec.version)
                await self.sup.run_hook(spec, "before_start")
        except (PermanentError, OSError) as e:
            await self.store.set_txn_state(dep, name, "commit_failed")
            logger.warning("commit.failed", reason=str(e))
            return self._result(dep, name, "commit", False, str(e), await self._running(name))
        reason = await self._switch_and_start(spec, dep, "commit", resumed)
        if reason:
            await self.store.set_txn_state(dep, name, "commit_failed")
            logger.warning("commit.failed", version=spec.version, reason=reason)
            return self._result(dep, name, "commit", False, reason, spec.version)
        await self.store.set_txn_state(dep, name, "committed")
        reason = await self._after_start(spec)
        await self._gc(name)
        logger.info("commit.done", version=spec.version)
        return self._result(dep, name, "commit", True, reason, spec.version)

    async def _commit_replay(self, cmd: Commit, txn: Txn | None) -> StepResult:
        dep, name = cmd.deployment_id, cmd.service
        running = await self._running(name)
        if txn is not None and txn.state == "committed":
            return self._result(dep, name, "commit", True, "", running)
        state = "no transaction" if txn is None else f"transaction is {txn.state}"
        return self._result(dep, name, "commit", False, f"not prepared: {state}", running)

    async def _after_start(self, spec: ServiceVersion) -> str:
        try:
            await self.sup.run_hook(spec, "after_start")
        except PermanentError as e:
            return str(e)
        return ""

    async def _switched(self, spec: ServiceVersion, dep: str, kind: SwitchKind) -> Switch | None:
        """The switch to `spec` this step recorded before the agent died, if `current`
        still points where it went: the step resumes after it instead of switching again."""
        switch = await self.store.open_switch(spec.name, dep, kind)
        if switch is None or switch.to_version != spec.version:
            return None
        if await asyncio.to_thread(self.releases.current_version, spec.name) != spec.version:
            return None
        self._logger(dep, spec.name).info("switch.resumed", switch_id=switch.id, kind=kind)
        return switch

    async def _switch_and_start(
        self, spec: ServiceVersion, dep: str, kind: SwitchKind, resumed: Switch | None = None
    ) -> str:
        """Stop what runs, switch `current` to `spec`, start it; '' if healthy, else why.

        `resumed`: the switch was made before a crash; start `spec` (or keep the process
        of it that runs) without stopping or switching again (I5: one switch a step).
        """
        name = spec.name
        if resumed is None:
            await self.sup.stop(name)
            switch_id = await _to_the_end(self._switch(name, spec.version, kind, dep))
            if kind == "commit":
                faults.point("agent.switched")
        else:
            switch_id = resumed.id
        try:
            record = await self._running_process(spec) if resumed else None
            if record is None:
                if resumed:
                    await self.sup.stop(name)  # whatever else runs (an adopted old version)
                record = await self.sup.start(spec)
            await self.sup.wait_healthy(spec, record)
        except PermanentError as e:
            reason = str(e)
        else:
            reason = ""
        # Settled only when the service became healthy or failed: an agent stopped (or
        # killed) meanwhile leaves the switch open, and the step resumes from it.
        await self.store.settle_switch(switch_id)
        return reason

    async def _switch(self, name: str, version: str, kind: SwitchKind, dep: str) -> int:
        """Switch `current` to `version` (in a thread: it fsyncs) and record the switch
        from the version it pointed at."""
        previous = await asyncio.to_thread(self.releases.switch, name, version)
        return await self.store.add_switch(name, previous, version, kind, dep)

    # --- abort ------------------------------------------------------------------

    async def abort(self, cmd: Abort) -> StepResult:
        dep, name = cmd.deployment_id, cmd.service
        await asyncio.to_thread(self.releases.discard, name, dep)
        txn = await self.store.txn(dep, name)
        if txn is not None and txn.state in ("preparing", "prepared", "no"):
            await self.store.set_txn_state(dep, name, "aborted")
        self._logger(dep, name).info("abort.done")
        return self._result(dep, name, "abort", True, "", await self._running(name))

    # --- revert -----------------------------------------------------------------

    async def revert(self, cmd: Revert) -> StepResult:
        dep, name = cmd.deployment_id, cmd.service
        logger = self._logger(dep, name)
        await asyncio.to_thread(self.releases.discard, name, dep)
        try:
            reason = await self._revert(name, cmd.to, dep)
        except (PermanentError, OSError) as e:
            reason = str(e)
        ok = not reason
        if await self.store.txn(dep, name) is not None:
            await self.store.set_txn_state(dep, name, "reverted" if ok else "revert_failed")
        running = await self._running(name)
        if ok:
            await self._gc(name)
            logger.info("revert.done", running=running)
        else:
            logger.warning("revert.failed", reason=reason, running=running)
        return self._result(dep, name, "revert", ok, reason, running)

    async def _revert(self, name: str, to: ServiceVersion | None, dep: str) -> str:
        """Go back to `to` (None: stop the service); '' on success, else why not."""
        if to is not None and await self._already_running(to):
            return ""  # a repeated revert: do not restart a healthy service
        resumed = None if to is None else await self._switched(to, dep, "revert")
        if to is not None and resumed is not None:
            return await self._switch_and_start(to, dep, "revert", resumed)
        await self._before_rollback(name, None if to is None else to.version)
        if to is None:
            await self._stop_service(name, dep)
            return ""
        if await self._stage(to, dep) is not None:
            await asyncio.to_thread(self.releases.promote, to, dep)
        return await self._switch_and_start(to, dep, "revert")

    async def _already_running(self, spec: ServiceVersion) -> bool:
        row = await self.store.service(spec.name)
        if row is None or row.version != spec.version or row.process is None:
            return False
        return driver.is_alive(row.process) and row.health == "healthy"

    async def _running_process(self, spec: ServiceVersion) -> ProcessRecord | None:
        """The live process of exactly `spec`'s version, if one runs (adopted)."""
        row = await self.store.service(spec.name)
        if row is None or row.version != spec.version or row.process is None:
            return None
        return row.process if driver.is_alive(row.process) else None

    async def _before_rollback(self, name: str, target: str | None) -> None:
        """Run before_rollback of the release `name` runs now, unless it is `target`."""
        row = await self.store.service(name)
        if row is not None and row.version != target:
            await self.sup.run_hook(row.spec, "before_rollback")

    async def _stop_service(self, name: str, dep: str) -> None:
        previous = await asyncio.to_thread(self.releases.current_version, name)
        await self.sup.stop(name)
        await asyncio.to_thread(self.releases.remove_current, name)
        await self.store.delete_service(name)
        self.sup.monitor.unwatch(name, "stopped")
        await self.store.add_switch(name, previous, None, "stop", dep)

    # --- helpers ----------------------------------------------------------------

    async def _running(self, name: str) -> str | None:
        row = await self.store.service(name)
        return None if row is None else row.version

    async def _gc(self, name: str) -> None:
        protect = {t.version for t in await self.store.txns(name, PROTECTED)}
        running = await self._running(name)
        if running:
            protect.add(running)
        removed = await asyncio.to_thread(
            self.releases.gc, name, self.settings.keep_releases, protect
        )
        if removed:
            self._logger(None, name).info("releases.removed", versions=removed)

    def _result(
        self, dep: str, name: str, step: Step, ok: bool, reason: str, running: str | None
    ) -> StepResult:
        return StepResult(deployment_id=dep, host_id=self.host_id, service=name,
                          step=step, ok=ok, reason=reason, running=running)  # fmt: skip


def _stage_files(
    releases: Releases, spec: ServiceVersion, deployment_id: str, limits: artifacts.Limits
) -> str | None:
    """Blocking: stage `spec`'s artifact for `deployment_id`, unless releases/<version>
    is intact already (None then); the staged dir."""
    if releases.is_intact(spec):
        return None
    releases.discard(spec.name, deployment_id)
    staged = releases.staging_dir(spec.name, deployment_id)
    staged.parent.mkdir(parents=True, exist_ok=True)
    scratch = releases.download_path(spec.name, deployment_id)
    artifacts.fetch(spec.artifact, spec.sha256, staged, scratch, limits)
    releases.mark(staged, spec)
    return str(staged)


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the step is cancelled meanwhile (the agent stopping),
    then let the cancellation through. For switching `current` and recording it: a
    cancel cannot stop the worker thread that switches, so the record must follow, or
    the resumed step would not find its switch and would switch again (I5)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
