"""A robust connection to one of several RabbitMQ nodes, reconnecting to any that is up.

`LOCKSTEP_AMQP_URL` may list the nodes of a cluster, comma-separated (issue 10).
`connect` tries them in turn, starting with the first, until one accepts; afterwards,
when the connection is lost (the node died, a network fault), aio-pika's robust
connection reconnects as usual, restoring channels, queues and consumers, and every
new attempt goes to the next node in the list, round robin, so a dead node is skipped
at the next attempt rather than retried for ever. A single URL behaves exactly as
aio-pika's own robust connection.

How: aio-pika's `RobustConnection` starts every connection attempt by setting its
`transport` to None and then connects to `self.url`; `ClusterConnection` makes both
properties, and moves to the next URL whenever a new attempt begins.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from yarl import URL


def split(urls: str) -> list[str]:
    """The URLs of a comma-separated `LOCKSTEP_AMQP_URL`, in order."""
    return [u.strip() for u in urls.split(",") if u.strip()]


def with_default(urls: str, key: str, value: str) -> str:
    """`urls` with the query parameter `key=value` on each that does not set `key`."""
    return ",".join(
        str(url) if key in (url := URL(u)).query else str(url.update_query({key: value}))
        for u in split(urls)
    )


class ClusterConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over the nodes `urls`, from `urls[first]` on."""

    def __init__(self, urls: list[str], first: int = 0, **kwargs: Any) -> None:
        self._urls = [URL(u) for u in urls]
        self._at = first % len(urls)
        super().__init__(self._urls[self._at], **kwargs)
        self._attempts = 0  # the constructor's own `transport = None` was no attempt

    @property
    def url(self) -> URL:
        return self._urls[self._at]

    @url.setter
    def url(self, value: URL) -> None:  # aio-pika sets it at start and on update_secret
        if hasattr(self, "_urls"):
            self._urls[self._at] = URL(value)

    @property
    def transport(self) -> Any:
        return self.__dict__.get("_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and hasattr(self, "_attempts"):  # an attempt begins (or a close)
            if self._attempts:
                self._at = (self._at + 1) % len(self._urls)
            self._attempts += 1
        self.__dict__["_transport"] = value

    @property
    def node(self) -> str:
        """The node this connection uses (or tries) now, without credentials."""
        return f"{self.url.host}:{self.url.port}"


async def connect(urls: list[str], each_within: float, **kwargs: Any) -> AbstractRobustConnection:
    """A connection to the first of `urls` that accepts one within `each_within`
    seconds (the last error if none does)."""
    error: BaseException | None = None
    for first in range(len(urls)):
        connection = ClusterConnection(urls, first, **kwargs)
        try:
            await connection.connect(timeout=each_within)
            return connection
        except Exception as e:
            error = e
            await connection.close()
    assert error is not None
    raise error
