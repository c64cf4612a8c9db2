"""Fixtures for the end-to-end tier: a real fleet per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet
from tests.support.procs import Procs


@pytest.fixture
def fleet(tmp_path: Path, procs: Procs, lockstep_env: dict[str, str]) -> Fleet:
    """A running coordinator; `procs` stops it and everything else at teardown."""
    f = Fleet(tmp_path, lockstep_env, procs)
    f.start_coordinator()
    return f


@pytest.fixture
def three_hosts(fleet: Fleet) -> Fleet:
    """payments on host-a and host-c, orders on host-b and host-c (host-c runs both)."""
    fleet.add_three_hosts()
    return fleet
