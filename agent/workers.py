"""One serial worker per service, fed from the agent's durable command log.

`agent.service.Agent` records each verified command in the log (`agent.store.commands`)
and hands it to `Workers.dispatch`, which queues it once on its service's worker: a
service's commands run one at a time, in the order they arrived, different services
side by side. A worker runs the step (`agent.steps`), reports the result, then marks
the command done with that report, so a crash in between runs it again on restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from agent.steps import Command, Steps
from agent.store import CommandLog, CommandRecord
from shared import faults, log, metrics
from shared.messages import Abort, Body, Commit, Prepare, Step, StepResult, Vote, decode
from shared.tasks import TaskGroup


class Workers:
    """The agent's per-service command queues and the tasks that work them."""

    def __init__(
        self,
        tasks: TaskGroup,
        commands: CommandLog,
        steps: Steps,
        report: Callable[[Body], Awaitable[None]],
        host_id: str,
    ) -> None:
        """`report`: sends a step's result to the coordinator (retried until sent)."""
        self._tasks = tasks
        self._commands = commands
        self._steps = steps
        self._report = report
        self.host_id = host_id
        self._queues: dict[str, asyncio.Queue[tuple[CommandRecord, Command | None]]] = {}
        self._inflight: set[str] = set()
        self.stopping = False
        """Set when the agent stops: nothing more is queued."""
        self._log = log.get("agent", host_id=host_id)

    def dispatch(self, record: CommandRecord, command: Command | None = None) -> None:
        """Queue `record` on its service's worker (once, however often it arrives);
        `command`: its body, as decoded on arrival (else decoded from the record)."""
        if self.stopping or record.id in self._inflight:
            return
        self._inflight.add(record.id)
        queue = self._queues.get(record.service)
        if queue is None:
            queue = self._queues[record.service] = asyncio.Queue()
            self._tasks.spawn(self._work(queue), f"worker:{record.service}", forever=True)
        queue.put_nowait((record, command))

    async def _work(self, queue: asyncio.Queue[tuple[CommandRecord, Command | None]]) -> None:
        while True:
            record, command = await queue.get()
            try:
                await self._execute(record, command)
            except Exception:  # the worker outlives any one command (it stays received)
                self._log.exception("command.failed", command_id=record.id, step=record.step,
                                    service=record.service)  # fmt: skip
            finally:
                self._inflight.discard(record.id)

    async def _execute(self, record: CommandRecord, decoded: Command | None) -> None:
        command: Any = decoded or decode(record.body.encode()).body
        logger = self._log.bind(deployment_id=record.deployment_id, service=record.service)
        logger.info("command.started", step=record.step, command_id=record.id)
        try:
            result = await self._steps.run(command)
        except Exception as e:  # a bug must not wedge the service's worker
            logger.exception("command.crashed", step=record.step)
            result = _failure(command, self.host_id, f"agent error: {e!r}")
        await self._report(result)
        if isinstance(result, Vote) and result.yes:
            faults.point("agent.voted")
        await self._commands.finish(record.id, result.model_dump(mode="json"))
        metrics.STEPS.labels(record.step, str(_succeeded(result)).lower()).inc()
        logger.info("command.done", step=record.step, command_id=record.id)


def recorded(record: CommandRecord) -> Body:
    """The report recorded for a done command."""
    if record.step == Prepare.KIND:
        return Vote.model_validate(record.result)
    return StepResult.model_validate(record.result)


def _succeeded(report: Body) -> bool:
    return report.yes if isinstance(report, Vote) else bool(getattr(report, "ok", False))


def _failure(command: Command, host_id: str, reason: str) -> Body:
    """The report for a command whose step crashed."""
    if isinstance(command, Prepare):
        return Vote(deployment_id=command.deployment_id, host_id=host_id,
                    service=command.spec.name, version=command.spec.version, yes=False,
                    reason=reason)  # fmt: skip
    step: Step = (
        "commit"
        if isinstance(command, Commit)
        else ("abort" if isinstance(command, Abort) else "revert")
    )
    return StepResult(deployment_id=command.deployment_id, host_id=host_id,
                      service=command.service, step=step, ok=False, reason=reason)  # fmt: skip
