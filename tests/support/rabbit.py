"""A RabbitMQ vhost per test, made and removed with rabbitmqctl."""

from __future__ import annotations

import subprocess
import time
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
        _delete(name)


def _delete(name: str, attempts: int = 3) -> None:
    """Delete a vhost; rabbitmqctl can fail transiently under load, so try again."""
    for attempt in range(attempts):
        try:
            rabbitmqctl("delete_vhost", name)
            return
        except subprocess.CalledProcessError:
            if attempt + 1 == attempts:
                raise
            time.sleep(1)  # rabbitmqctl's own retry pacing, not a test synchronisation
