"""Settings read from LOCKSTEP_* variables: the heartbeat is one setting both sides read."""

from __future__ import annotations

import pytest

from shared.config import AgentSettings, CoordinatorSettings


def test_one_heartbeat_variable_drives_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKSTEP_HEARTBEAT_INTERVAL", "750ms")
    assert AgentSettings().heartbeat_interval == 0.75
    assert CoordinatorSettings().heartbeat_interval == 0.75


def test_heartbeat_defaults_to_two_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCKSTEP_HEARTBEAT_INTERVAL", raising=False)
    assert AgentSettings().heartbeat_interval == 2.0
    assert CoordinatorSettings().heartbeat_interval == 2.0


def test_lost_after_is_missed_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCKSTEP_LOST_AFTER_MISSED", raising=False)
    assert CoordinatorSettings(heartbeat_interval="3s").lost_after == 9.0
    assert CoordinatorSettings(heartbeat_interval=1, lost_after_missed=5).lost_after == 5.0
