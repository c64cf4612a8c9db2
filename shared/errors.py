"""The exception tree, grouped by how lockstep reacts to each branch.

- `UserError`: bad input from an operator or integrating system. The CLI turns it
  into exit code 2 with the field and the reason; the coordinator replies with it.
- `ProtocolError` (and `DecodeError`): a message we must not act on. The consumer
  dead-letters it with the reason and keeps running.
- `TransientError` (and `BrokerUnavailable`): may succeed if retried with backoff;
  the CLI turns an unreachable coordinator or broker into exit code 3. `Fenced` (a
  former leader's write refused) requeues the delivery for the active coordinator.
- `PermanentError`: a step that failed for good (a download, a health check); the
  protocol records it and reacts (NO vote, compensation).

Library errors are translated at the boundary: `raise BrokerUnavailable(...) from e`.
"""

from __future__ import annotations


class LockstepError(Exception):
    """Root of every error lockstep raises on purpose."""


class UserError(LockstepError):
    """Invalid input: names the field at fault and the reason (exit code 2)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class ProtocolError(LockstepError):
    """A message that must not be acted on; it is dead-lettered with `reason`.

    `code` is the short, fixed name of the refusal (`bad_signature`, `expired`, ...):
    the dead-letter header starts with it and the refusal metric is labelled by it.
    """

    def __init__(self, reason: str, code: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Refused(ProtocolError):
    """A message refused by a security check (SPEC 7): its reason starts with `code`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}", code)


class DecodeError(ProtocolError):
    """Raw bytes that do not decode into a valid envelope (the one decode point)."""

    def __init__(self, raw: bytes, cause: str) -> None:
        super().__init__(cause)
        self.raw = raw


class TransientError(LockstepError):
    """A failure that may go away if the operation is retried later."""


class BrokerUnavailable(TransientError):
    """RabbitMQ could not be reached or dropped the connection."""


class StoreUnavailable(TransientError):
    """The coordinator's database could not be reached, or dropped the connection."""


class CoordinatorTimeout(TransientError):
    """The coordinator did not answer a request before its deadline (exit code 3)."""


class Fenced(TransientError):
    """A coordinator's write refused: the lease moved past its epoch (issue 10).

    It is no longer the active coordinator: the transaction was rolled back, the
    delivery it was handling is requeued for the new one, and it steps down.
    """

    def __init__(self, epoch: int, held: int | None) -> None:
        now = f"now {held}" if held is not None else "its lease is lost or not confirmed"
        super().__init__(f"fenced: this coordinator's epoch {epoch} is past ({now})")
        self.epoch = epoch
        self.held = held


class PermanentError(LockstepError):
    """A step that failed for good; the protocol records the reason and reacts."""
