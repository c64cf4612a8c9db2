"""A RabbitMQ vhost per test, made and removed with rabbitmqctl."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

BASE_URL = "amqp://guest:guest@127.0.0.1:5672/"


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


@contextmanager
def vhost(label: str) -> Iterator[str]:
    """A fresh vhost for `label`; yields its AMQP URL and deletes it afterwards."""
    name = f"lockstep-test-{label[:40]}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{BASE_URL}{name}"
    finally:
        rabbitmqctl("delete_vhost", name)
