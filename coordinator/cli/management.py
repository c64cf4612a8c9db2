"""The RabbitMQ management HTTP API of one vhost, as `lockstep broker` uses it
(coordinator/cli/broker.py; the least-privilege e2e tests use it too).

Each call is one HTTP request (stdlib urllib) with an administrator's credentials;
refusals become `UserError` (bad credentials, a missing vhost, a refused object),
`NotFound`, or `BrokerUnavailable` (no answer, 5xx).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import urllib.error
import urllib.request
from typing import Any, NoReturn
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from shared import topology
from shared.errors import BrokerUnavailable, UserError

ENABLE_HINT = "enable it on the broker: `rabbitmq-plugins enable rabbitmq_management`"


_DURABLE: dict[str, Any] = {"durable": True, "auto_delete": False, "arguments": {}}


def _path(*parts: str) -> str:
    """An API path; each part (a vhost "/" among them) percent-encoded."""
    return "/".join(quote(part, safe="") for part in parts)


class NotFound(Exception):
    """The management API answered 404 (its reason attached)."""


class Management:
    """The management HTTP API of one RabbitMQ vhost: every call is one HTTP request."""

    def __init__(self, url: str, vhost: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        hostport = parts.netloc.rpartition("@")[2]
        self.base = urlunsplit((parts.scheme, hostport, parts.path.rstrip("/"), "", ""))
        self._auth = "Basic " + base64.b64encode(f"{self.user}:{password}".encode()).decode()
        self.vhost = vhost
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The decoded answer of one API call; `NotFound`, `UserError` (401/403, 400) or
        `BrokerUnavailable` (no answer, 5xx) otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": self._auth, "Content-Type": "application/json"}
        request = urllib.request.Request(f"{self.base}/api/{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                text = answer.read()
        except urllib.error.HTTPError as e:
            self._refused(e.code, _reason(e), unquote(path))
        except (OSError, ValueError) as e:  # URLError, refused, timeout; ValueError: bad URL
            raise BrokerUnavailable(
                f"cannot reach the RabbitMQ management API at {self.base} ({e}); "
                f"{ENABLE_HINT}, or set --management-url / LOCKSTEP_MANAGEMENT_URL"
            ) from e
        return json.loads(text) if text.strip() else None

    def _refused(self, status: int, reason: str, what: str) -> NoReturn:
        if status in (401, 403):
            raise UserError("--management-url", f"the management API refused user "
                            f"{self.user!r} ({status}: {reason}); use an administrator, e.g. "
                            "http://ADMIN:PASSWORD@HOST:15672")  # fmt: skip
        if reason == "vhost_not_found":
            raise UserError("LOCKSTEP_AMQP_URL", f"vhost {self.vhost!r} does not exist; "
                            f"create it first (PUT /api/vhosts/{_path(self.vhost)})")  # fmt: skip
        if status == 404:
            raise NotFound(reason)
        if status == 400:
            raise UserError(what, f"the broker refused it: {reason}")
        raise BrokerUnavailable(f"the management API failed on {what}: {status} {reason}")

    def declare_exchange(self, spec: topology.Exchange) -> None:
        body = {"type": spec.type, "internal": False, **_DURABLE}
        self.call("PUT", _path("exchanges", self.vhost, spec.name), body)

    def declare_queue(self, spec: topology.Queue) -> None:
        """The queue with `declare_arguments()` and every binding of `spec`."""
        body = {**_DURABLE, "durable": spec.durable, "arguments": spec.declare_arguments()}
        self.call("PUT", _path("queues", self.vhost, spec.name), body)
        for exchange, key in spec.bindings:
            path = _path("bindings", self.vhost, "e", exchange, "q", spec.name)
            self.call("POST", path, {"routing_key": key, "arguments": {}})

    def require_exchange(self, name: str) -> None:
        """`UserError` unless `name` exists: `broker setup` has not run on this vhost."""
        try:
            self.call("GET", _path("exchanges", self.vhost, name))
        except NotFound as e:
            reason = f"{name} does not exist on vhost {self.vhost!r}: run `lockstep broker setup`"
            raise UserError("LOCKSTEP_AMQP_URL", reason) from e

    def ensure_user(self, user: str) -> str | None:
        """Create `user` with a generated password and its role's permissions; the
        password, or None when the user existed (its password is left alone)."""
        password: str | None = None
        try:
            self.call("GET", _path("users", user))
        except NotFound:
            password = secrets.token_urlsafe(24)
            self.call("PUT", _path("users", user), {"password": password, "tags": ""})
        self.call("PUT", _path("permissions", self.vhost, user), rights(user))
        return password


def rights(user: str) -> dict[str, str]:
    """`user`'s permissions as the API (and definitions.json) spell them."""
    return dataclasses.asdict(topology.permissions(user))


def _reason(error: urllib.error.HTTPError) -> str:
    """The `reason` of the API's JSON error document, or the HTTP reason phrase."""
    try:
        return str(json.loads(error.read())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(error.reason)
