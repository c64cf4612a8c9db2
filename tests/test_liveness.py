"""Issue 9 "liveness off the critical path": a real SQLite store, no broker.

The coordinator keeps `last_seen` and what each host runs in memory and writes them in
one transaction per sweep; it judges liveness at the wall clock less how far behind its
heartbeats it is, so its own backlog never looks like silent hosts, while a silent
host (or a silent fleet) is still judged at the wall clock.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator import liveness as liveness_module
from coordinator import views
from coordinator import watch as watch_module
from coordinator.liveness import Liveness
from coordinator.records import AgentRecord
from coordinator.store import Store
from coordinator.watch import Tell, Watch
from shared.config import CoordinatorSettings
from shared.messages import ServiceState
from tests.support.stores import behind

LOST_AFTER = 6.0


def _web(version: str) -> list[ServiceState]:
    return [ServiceState(service="web", version=version, health="healthy")]


async def _fleet(store_at: str | Path, hosts: list[str]) -> tuple[Store, Liveness]:
    store = await Store.open(store_at)
    for host in hosts:
        await store.enroll(host, f"key-{host}", {}, "approved")
    await behind(store_at, "UPDATE agents SET last_seen = 0")  # heard of long ago, if ever
    return store, Liveness(store, CoordinatorSettings())


async def _no_events(deployment_id: str | None, event: str, data: dict[str, object]) -> None:
    pass


def _watch(store: Store, liveness: Liveness, tell: Tell) -> Watch:
    """A watch over `store` with no intake: these tests register no release, so it never
    converges anything."""
    return Watch(store, liveness, CoordinatorSettings(), None, _no_events, tell)  # type: ignore[arg-type]


def _alive(agents: list[AgentRecord], judged: float) -> dict[str, bool]:
    return {a.host_id: views.alive(a.last_seen, judged, LOST_AFTER) for a in agents}


async def test_a_backlog_handled_late_does_not_make_live_hosts_look_lost(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a", "b"])
    try:
        sent = time.time() - 10  # handled 10 s after it was sent: the coordinator was busy
        for host in ("a", "b"):
            await liveness.beat(host, sent, _web("1.0.0"), None)
        await liveness.flush()
        assert liveness.behind >= 10
        agents = await liveness.agents()
        assert _alive(agents, liveness.now()) == {"a": True, "b": True}
        assert _alive(agents, time.time()) == {"a": False, "b": False}  # what it used to judge
    finally:
        await store.close()


async def test_a_dead_hosts_old_heartbeat_in_the_backlog_does_not_revive_it(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["live", "dead"])
    try:
        await liveness.beat("dead", time.time() - 20, _web("1.0.0"), None)
        await liveness.beat("live", time.time(), _web("1.0.0"), None)
        await liveness.flush()
        assert liveness.behind < 1  # the freshest heartbeat says how far behind it is
        assert _alive(await liveness.agents(), liveness.now()) == {"live": True, "dead": False}
    finally:
        await store.close()


async def test_a_silent_fleet_is_judged_at_the_wall_clock(store_at: str | Path) -> None:
    store, liveness = await _fleet(store_at, ["a"])
    try:
        await liveness.beat("a", time.time() - 10, _web("1.0.0"), None)
        await liveness.flush()
        assert liveness.behind >= 10
        await liveness.flush()  # no heartbeat since: nothing to be behind on
        assert liveness.behind == 0
        assert _alive(await liveness.agents(), liveness.now()) == {"a": False}
    finally:
        await store.close()


async def test_views_and_last_seen_are_kept_in_memory_and_written_in_one_flush(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a"])
    try:
        now = time.time()
        await liveness.beat("a", now - 2, _web("1.0.0"), {"role": "web"})
        assert liveness.step("a", "web", "2.0.0", "healthy", now - 1)
        assert liveness.step("a", "web", "0.9.0", "healthy", now - 3)  # older: changes nothing
        (stored,) = await store.agents()
        assert stored.services == ()  # nothing written yet
        assert stored.last_seen < now - 2
        (merged,) = await liveness.agents()
        assert [(s.service, s.version) for s in merged.services] == [("web", "2.0.0")]
        await liveness.flush()
        (stored,) = await store.agents()
        assert [(s.service, s.version) for s in stored.services] == [("web", "2.0.0")]
        assert stored.labels == {"role": "web"}
        assert stored.last_seen == now - 2
    finally:
        await store.close()


async def test_a_step_result_for_a_host_not_yet_in_memory_is_left_to_the_store(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a"])
    try:
        assert not liveness.step("a", "web", "2.0.0", "healthy", time.time())
    finally:
        await store.close()


async def test_a_host_is_judged_by_the_period_it_beats_at_and_that_survives_a_restart(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["slow", "fast"])
    settings = CoordinatorSettings()
    try:
        sent = time.time() - 30  # 30 s of silence since
        await liveness.beat("slow", sent, _web("1.0.0"), None, interval=20.0)
        await liveness.beat("fast", sent, _web("1.0.0"), None)  # at heartbeat_interval (2 s)
        await liveness.flush()
        agents = {a.host_id: a for a in await liveness.agents()}
        now = time.time()
        assert views.host_alive(agents["slow"], now, settings.lost_after_for)  # 3 x 20 s
        assert not views.host_alive(agents["fast"], now, settings.lost_after_for)  # 3 x 2 s
        restarted = {a.host_id: a for a in await Liveness(store, settings).agents()}
        assert restarted["slow"].heartbeat_interval == 20.0
        assert views.host_alive(restarted["slow"], now, settings.lost_after_for)
    finally:
        await store.close()


async def test_a_large_fleet_is_told_a_longer_period_once_and_judged_by_it_until_it_says_it(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a"])
    try:
        now = time.time()
        assert not await liveness.beat("a", now, _web("1.0.0"), None, 2.0)  # not sized yet
        liveness.size(1000)  # 1,000 agents at 150 heartbeats a second at most: every 8 s
        assert liveness.period == 8.0
        assert await liveness.beat("a", now, _web("1.0.0"), None, 2.0)  # to be told
        liveness.told("a", 8.0)
        assert not await liveness.beat("a", now + 1, _web("1.0.0"), None, 2.0)  # told already
        (judged,) = await liveness.agents()
        assert judged.heartbeat_interval == 8.0  # told and unconfirmed: the longer one
        assert not await liveness.beat("a", now + 2, _web("1.0.0"), None, 8.0)  # says it
        liveness.size(100)  # the fleet shrank: back to 2 s
        assert await liveness.beat("a", now + 3, _web("1.0.0"), None, 8.0)
        liveness.told("a", 2.0)
        (judged,) = await liveness.agents()
        assert judged.heartbeat_interval == 8.0  # it still beats every 8 s until it says 2
    finally:
        await store.close()


async def test_a_sweep_reads_the_agents_from_the_store_only_after_the_store_changed_them(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a", "b"])
    try:
        assert [a.labels for a in await liveness.agents()] == [{}, {}]
        await behind(store_at, """UPDATE agents SET labels = '{"role": "db"}'""")
        now = time.time()
        await liveness.beat("a", now, _web("2.0.0"), None)  # news in memory: laid over
        agents = {a.host_id: a for a in await liveness.agents()}
        assert (agents["a"].labels, agents["b"].labels) == ({}, {})  # not read again
        assert [s.version for s in agents["a"].services] == ["2.0.0"]
        assert agents["a"].last_seen == now
        await store.set_agent("b", state="lost")  # a write through the store: read again
        agents = {a.host_id: a for a in await liveness.agents()}
        assert (agents["b"].labels, agents["b"].state) == ({"role": "db"}, "lost")
        assert [s.version for s in agents["a"].services] == ["2.0.0"]  # memory laid over
    finally:
        await store.close()


async def test_after_a_restart_a_host_told_a_shorter_period_is_judged_by_the_one_it_beats_at(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a"])
    try:
        await liveness.beat("a", time.time(), _web("1.0.0"), None, 16.0)
        await liveness.flush()
        restarted = Liveness(store, CoordinatorSettings())
        await restarted.agents()
        restarted.told("a", 8.0)  # the fleet shrank while the coordinator was away
        (judged,) = await restarted.agents()
        assert judged.heartbeat_interval == 16.0  # until it says 8, it may beat every 16 s
    finally:
        await store.close()


async def test_a_host_that_came_up_counts_as_such_only_while_it_runs_what_its_hello_said(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a", "b"])
    try:
        for host in ("a", "b"):
            await store.agent_seen(host, [s.model_dump() for s in _web("1.0.0")], {}, time.time())
            liveness.hello(host, _web("1.0.0"))
        assert liveness.came_up(await liveness.agents()) == {"a", "b"}
        await liveness.beat("a", time.time(), _web("1.0.0"), None)  # says the same again
        assert liveness.came_up(await liveness.agents()) == {"a", "b"}
        liveness.step("a", "web", "2.0.0", "healthy", time.time())  # a step since its hello
        liveness.settled(["b"])  # a sweep found it needs nothing
        assert liveness.came_up(await liveness.agents()) == set()
    finally:
        await store.close()


async def test_a_stalled_sweep_does_not_take_its_silent_fleet_for_a_smaller_one(
    store_at: str | Path,
) -> None:
    store, liveness = await _fleet(store_at, ["a"])  # silent for ever (last_seen 0)
    told: list[tuple[list[str], float]] = []
    settings = CoordinatorSettings()
    watch = _watch(store, liveness, lambda hosts, p: told.append((hosts, p)))
    try:
        liveness.size(1000)
        watch._last_sweep = time.time() - 10 * settings.heartbeat_interval  # it was stalled
        await watch.sweep()
        assert (liveness.period, told) == (8.0, [])
        await watch.sweep()  # on time: the silent fleet is a small one
        assert liveness.period == settings.heartbeat_interval
        assert told == [([], settings.heartbeat_interval)]
    finally:
        await store.close()


async def test_a_host_that_never_says_the_period_it_was_told_is_told_once_more_then_left(
    store_at: str | Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent older than the Ping's period refuses it: told again after RETELL_AFTER
    (here at once), in case the Ping was lost, and then no more until it says hello."""
    monkeypatch.setattr(liveness_module, "RETELL_AFTER", -1.0)
    store, liveness = await _fleet(store_at, ["old"])
    try:
        liveness.size(1000)
        now = time.time()
        assert await liveness.beat("old", now, _web("1.0.0"), None)  # says nothing: 2 s
        liveness.told("old", 8.0)
        assert await liveness.beat("old", now + 1, _web("1.0.0"), None)  # once more
        liveness.told("old", 8.0)
        assert not await liveness.beat("old", now + 2, _web("1.0.0"), None)  # left alone
        liveness.hello("old", _web("1.0.0"))  # it restarted (upgraded, perhaps)
        assert await liveness.beat("old", now + 3, _web("1.0.0"), None)
    finally:
        await store.close()


async def test_only_the_same_convergence_of_a_host_waits_before_it_is_tried_again(
    store_at: str | Path,
) -> None:
    """A host converged moments ago that went down and came back after a later release
    needs another change: it does not wait out RETRY_AFTER (the converge benchmark's
    second rack return took 5 s longer for that)."""
    store, liveness = await _fleet(store_at, ["h"])
    watch = _watch(store, liveness, lambda hosts, p: None)
    try:
        now = time.time()
        watch._tried["h"] = ({"web": "1.0.2"}, now + watch_module.RETRY_AFTER)
        assert not watch._may_try("h", {"web": "1.0.2"}, now)  # the same change: it waits
        assert watch._may_try("h", {"web": "1.0.4"}, now)  # another one: at once
        assert watch._may_try("h", {"web": "1.0.2"}, now + watch_module.RETRY_AFTER)
    finally:
        await store.close()


async def test_a_period_that_could_not_be_sent_is_told_at_the_next_heartbeat(
    store_at: str | Path,
) -> None:
    """A Ping the broker refused (unroutable, or the broker away) is no telling: it
    does not count towards TELLS, and the next heartbeat asks for it again."""
    store, liveness = await _fleet(store_at, ["a"])
    try:
        liveness.size(1000)
        now = time.time()
        for attempt in range(3):
            assert await liveness.beat("a", now + attempt, _web("1.0.0"), None), attempt
            liveness.told("a", 8.0)
            liveness.untold("a", 8.0)
    finally:
        await store.close()


async def test_a_coordinator_that_just_took_over_presumes_live_hosts_alive_for_a_full_period(
    store_at: str | Path,
) -> None:
    """Issue 10: a standby that took over (or a coordinator that restarted) was not
    listening before; the silence is its own, so a host the store last knew alive counts
    alive until lost_after past the moment it began listening, and one it knew lost
    stays lost."""
    store, liveness = await _fleet(store_at, ["quiet", "gone"])  # last seen long ago
    try:
        await store.set_agent("gone", state="lost")
        agents = await liveness.agents()
        assert _alive(agents, liveness.now()) == {"quiet": True, "gone": False}
        later = liveness.since + LOST_AFTER + 0.1  # still unheard a full period later
        assert _alive(agents, later) == {"quiet": False, "gone": False}
        assert (await store.agents())[1].last_seen == 0  # presumed, never written
    finally:
        await store.close()
