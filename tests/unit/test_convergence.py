"""Convergence grouping (pure): hosts needing the same change converge as one deployment."""

from __future__ import annotations

from coordinator.convergence import Group, groups


def test_hosts_needing_the_same_change_from_the_same_versions_make_one_group() -> None:
    fixes = {f"h{i:03d}": {"web": "2.0.0"} for i in range(200)}
    running: dict[str, dict[str, str | None]] = {h: {"web": "1.0.0"} for h in fixes}
    found = groups(fixes, running)
    assert found == [Group({"web": "2.0.0"}, {"web": "1.0.0"}, tuple(sorted(fixes)))]


def test_different_changes_or_different_starting_versions_make_different_groups() -> None:
    fixes = {
        "a": {"web": "2.0.0"},
        "b": {"web": "2.0.0"},
        "c": {"web": "2.0.0", "api": "3.0.0"},
        "d": {"api": "3.0.0", "web": "2.0.0"},
        "e": {"web": "2.0.0"},
    }
    running: dict[str, dict[str, str | None]] = {
        "a": {"web": "1.0.0"}, "b": {"web": "1.0.0"}, "e": {},
        "c": {"web": "1.0.0", "api": "2.0.0"}, "d": {"web": "1.0.0", "api": "2.0.0"},
    }  # fmt: skip
    found = groups(fixes, running)
    assert [g.hosts for g in found] == [("a", "b"), ("c", "d"), ("e",)]
    assert found[2].running == {"web": None}
    assert found[1].fix == {"api": "3.0.0", "web": "2.0.0"}


def test_hosts_with_nothing_to_fix_make_no_group() -> None:
    assert groups({"a": {}, "b": {}}, {}) == []
