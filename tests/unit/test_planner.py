"""Tier (a): the planner's waves, batches, participants and ranks, table-driven, no I/O."""

from __future__ import annotations

import json
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.planner import AgentInfo, Participant, Plan, plan, ranks, selects
from coordinator.resolver import Catalog, check
from shared.errors import UserError
from shared.specs import ServiceVersion, Strategy
from shared.versions import satisfies


def spec(
    name: str, version: str, requires: dict[str, str], hosts: dict[str, str]
) -> ServiceVersion:
    return ServiceVersion(
        name=name,
        version=version,
        artifact=f"file:///srv/{name}-{version}",
        run="python server.py",
        health={"exec": "true"},
        requires=requires,
        hosts=hosts,
    )


def sv(
    name: str, version: str, hosts: dict[str, str] | None = None, **requires: str
) -> ServiceVersion:
    return spec(name, version, requires, hosts or {})


def catalog_of(*specs: ServiceVersion) -> Catalog:
    return {s.key: s for s in specs}


def fleet(count: int, **labels: str) -> list[AgentInfo]:
    return [AgentInfo(f"h{i}", labels) for i in range(1, count + 1)]


def hosts_of(batch: tuple[Participant, ...]) -> list[str]:
    return sorted({p.host for p in batch})


def assert_every_wave_valid(result: Plan, catalog: Catalog) -> None:
    for wave in result.waves:
        assert check(wave.state_after, catalog) == []
    if result.waves:
        assert dict(result.waves[-1].state_after) == dict(result.target)


ONE = Strategy()
# orders 2 needs payments 2; orders 1 accepts any payments >= 1
UPGRADE = catalog_of(
    sv("payments", "1.0.0"),
    sv("payments", "2.0.0"),
    sv("orders", "1.0.0", payments=">=1.0.0"),
    sv("orders", "2.0.0", payments=">=2.0.0"),
)
# orders 1 refuses payments 2, orders 2 needs it: neither order works
LOCKED = catalog_of(
    sv("payments", "1.0.0"),
    sv("payments", "2.0.0"),
    sv("orders", "1.0.0", payments="<2.0.0"),
    sv("orders", "2.0.0", payments=">=2.0.0"),
)
# b 1 refuses a 2 and nothing requires anything in the target: b must go first
REVERSED = catalog_of(
    sv("a", "1.0.0"),
    sv("a", "2.0.0"),
    sv("b", "1.0.0", a="<2.0.0"),
    sv("b", "2.0.0"),
)
V1 = {"orders": "1.0.0", "payments": "1.0.0"}
V2 = {"orders": "2.0.0", "payments": "2.0.0"}


@pytest.mark.parametrize(
    ("catalog", "current", "target", "waves", "synchronized"),
    [
        pytest.param(UPGRADE, V1, V2, [("payments",), ("orders",)], False, id="providers-first"),
        pytest.param(
            UPGRADE,
            V1,
            {"orders": "1.0.0", "payments": "2.0.0"},
            [("payments",)],
            False,
            id="one-changed",
        ),
        pytest.param(LOCKED, V1, V2, [("orders", "payments")], True, id="no-order-works"),
        pytest.param(
            REVERSED,
            {"a": "1.0.0", "b": "1.0.0"},
            {"a": "2.0.0", "b": "2.0.0"},
            [("b",), ("a",)],
            False,
            id="search-leaves-preferred-order",
        ),
        pytest.param(UPGRADE, {}, V2, [("payments",), ("orders",)], False, id="new-services"),
        pytest.param(UPGRADE, V2, V2, [], False, id="nothing-changed"),
    ],
)
def test_waves_keep_every_intermediate_set_valid(
    catalog: Catalog,
    current: dict[str, str],
    target: dict[str, str],
    waves: list[tuple[str, ...]],
    synchronized: bool,
) -> None:
    result = plan(current, target, catalog, fleet(2), ONE)
    assert [w.services for w in result.waves] == waves
    assert all(w.synchronized == synchronized for w in result.waves)
    assert_every_wave_valid(result, catalog)


def test_unchanged_services_get_no_participants() -> None:
    target = {"orders": "1.0.0", "payments": "2.0.0"}
    result = plan(V1, target, UPGRADE, fleet(2), ONE)
    assert result.changed == ("payments",)
    assert {p.service for p in result.participants()} == {"payments"}


def test_rank_puts_providers_below_consumers() -> None:
    result = plan(V1, V2, UPGRADE, fleet(1), ONE)
    assert dict(result.rank) == {"payments": 0, "orders": 1}


def test_rank_gives_a_requires_cycle_one_rank() -> None:
    catalog = catalog_of(
        sv("a", "1.0.0", b=">=1.0.0"),
        sv("b", "1.0.0", a=">=1.0.0"),
        sv("c", "1.0.0", a=">=1.0.0"),
        sv("d", "1.0.0"),
    )
    target = {"a": "1.0.0", "b": "1.0.0", "c": "1.0.0", "d": "1.0.0"}
    assert ranks(sorted(target), target, catalog) == {"a": 0, "b": 0, "c": 1, "d": 0}


def test_plan_refuses_an_invalid_target() -> None:
    with pytest.raises(UserError) as caught:
        plan(V1, {"orders": "2.0.0", "payments": "1.0.0"}, UPGRADE, fleet(1), ONE)
    assert caught.value.field == "services.orders"
    assert ">=2.0.0" in caught.value.reason


@pytest.mark.parametrize(
    "agents",
    [
        pytest.param([AgentInfo("h1", {"role": "db"})], id="no-label-match"),
        pytest.param([AgentInfo("h1", {"role": "web"}, alive=False)], id="match-is-dead"),
        pytest.param([], id="no-agents"),
    ],
)
def test_selector_matching_no_live_agent_is_a_user_error(agents: list[AgentInfo]) -> None:
    catalog = catalog_of(sv("web", "1.0.0", hosts={"role": "web"}))
    with pytest.raises(UserError) as caught:
        plan({}, {"web": "1.0.0"}, catalog, agents, ONE)
    assert caught.value.field == "services.web.hosts"
    assert "role=web" in caught.value.reason


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({}, {}, True),
        ({}, {"role": "web"}, True),
        ({"role": "web"}, {"role": "web", "zone": "a"}, True),
        ({"role": "web"}, {"role": "db"}, False),
        ({"role": "web", "zone": "a"}, {"role": "web"}, False),
    ],
)
def test_selects_needs_every_selector_label(
    selector: dict[str, str], labels: dict[str, str], selected: bool
) -> None:
    assert selects(selector, labels) is selected


def test_participants_are_the_live_selected_hosts_only() -> None:
    catalog = catalog_of(sv("web", "1.0.0", hosts={"role": "web"}))
    agents = [
        AgentInfo("h3", {"role": "web"}),
        AgentInfo("h1", {"role": "web"}),
        AgentInfo("h2", {"role": "db"}),
        AgentInfo("h4", {"role": "web"}, alive=False),
    ]
    result = plan({}, {"web": "1.0.0"}, catalog, agents, ONE)
    assert [p.host for p in result.participants()] == ["h1", "h3"]


@pytest.mark.parametrize(
    ("hosts", "max_parallel", "canary", "batches"),
    [
        pytest.param(4, "50%", 0, [["h1", "h2"], ["h3", "h4"]], id="half-of-4"),
        pytest.param(6, 2, 0, [["h1", "h2"], ["h3", "h4"], ["h5", "h6"]], id="2-of-6"),
        pytest.param(3, "100%", 0, [["h1", "h2", "h3"]], id="all-at-once"),
        pytest.param(3, "10%", 0, [["h1"], ["h2"], ["h3"]], id="at-least-one"),
        pytest.param(4, "50%", 1, [["h1"], ["h2", "h3"], ["h4"]], id="canary-then-half"),
        pytest.param(2, 1, 5, [["h1", "h2"]], id="canary-wider-than-fleet"),
    ],
)
def test_batches_follow_max_parallel_and_canary(
    hosts: int, max_parallel: str | int, canary: int, batches: list[list[str]]
) -> None:
    catalog = catalog_of(sv("payments", "2.0.0"))
    strategy = Strategy(max_parallel=max_parallel, canary=canary)
    result = plan({}, {"payments": "2.0.0"}, catalog, fleet(hosts), strategy)
    assert [hosts_of(b) for b in result.waves[0].batches] == batches


def test_canary_batch_only_in_the_first_wave() -> None:
    strategy = Strategy(max_parallel="50%", canary=1)
    result = plan(V1, V2, UPGRADE, fleet(4), strategy)
    assert [len(b) for b in result.waves[0].batches] == [1, 2, 1]
    assert [len(b) for b in result.waves[1].batches] == [2, 2]


def test_host_running_both_services_switches_both_in_a_synchronized_batch() -> None:
    result = plan(V1, V2, LOCKED, fleet(2), Strategy(max_parallel=1))
    (wave,) = result.waves
    assert wave.batches == (
        (
            Participant("h1", "orders", "2.0.0", "1.0.0"),
            Participant("h1", "payments", "2.0.0", "1.0.0"),
        ),
        (
            Participant("h2", "orders", "2.0.0", "1.0.0"),
            Participant("h2", "payments", "2.0.0", "1.0.0"),
        ),
    )


def test_synchronized_batch_gives_each_host_only_the_services_selecting_it() -> None:
    web = {"role": "web"}
    catalog = catalog_of(
        sv("payments", "1.0.0"),
        sv("payments", "2.0.0"),
        sv("orders", "1.0.0", web, payments="<2.0.0"),
        sv("orders", "2.0.0", web, payments=">=2.0.0"),
    )
    agents = [AgentInfo(f"h{i}", {"role": "web" if i % 2 else "db"}) for i in range(1, 7)]
    result = plan(V1, V2, catalog, agents, Strategy(max_parallel=4))
    (wave,) = result.waves
    assert wave.synchronized
    assert [[(p.host, p.service) for p in batch] for batch in wave.batches] == [
        [("h1", "orders"), ("h1", "payments"), ("h2", "payments"), ("h3", "orders"),
         ("h3", "payments"), ("h4", "payments")],
        [("h5", "orders"), ("h5", "payments"), ("h6", "payments")],
    ]  # fmt: skip


def test_host_running_both_services_appears_in_each_wave() -> None:
    result = plan(V1, V2, UPGRADE, fleet(1), ONE)
    assert [(p.host, p.service) for p in result.participants()] == [
        ("h1", "payments"),
        ("h1", "orders"),
    ]


def test_from_version_comes_from_running_then_current() -> None:
    running = {"h1": {"payments": "0.9.0"}, "h2": {}}
    result = plan(V1, {**V1, "payments": "2.0.0"}, UPGRADE, fleet(3), ONE, running)
    assert [(p.host, p.from_version) for p in result.participants()] == [
        ("h1", "0.9.0"),
        ("h2", None),
        ("h3", "1.0.0"),
    ]


def test_to_dict_is_json_and_round_trips_the_waves() -> None:
    result = plan(V1, V2, UPGRADE, fleet(2), Strategy(canary=1))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["changed"] == ["orders", "payments"]
    assert data["rank"] == {"orders": 1, "payments": 0}
    assert [w["services"] for w in data["waves"]] == [["payments"], ["orders"]]
    assert data["waves"][0]["batches"][0] == [
        {"host": "h1", "service": "payments", "version": "2.0.0", "from_version": "1.0.0"}
    ]
    assert data["waves"][-1]["state_after"] == V2


NAMES = ["a", "b", "c", "d"]
VERSIONS = ["1.0.0", "2.0.0", "3.0.0"]
CONSTRAINTS = [">=2.0.0", "<2.0.0", "<3.0.0", "!=2.0.0", "==3.0.0", ">=1.0.0"]


def requires_for(
    draw: st.DrawFn, name: str, version: str, target: dict[str, str]
) -> dict[str, str]:
    """Random requires; those of the target's own versions hold in the target."""
    if target.get(name) != version:
        others = st.sampled_from([n for n in NAMES if n != name])
        return draw(st.dictionaries(others, st.sampled_from(CONSTRAINTS), max_size=2))
    providers = sorted(n for n in target if n != name)
    deps = draw(st.sets(st.sampled_from(providers), max_size=2)) if providers else set()
    held = {d: [c for c in CONSTRAINTS if satisfies(target[d], c)] for d in sorted(deps)}
    return {d: draw(st.sampled_from(held[d])) for d in held}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Catalog, dict[str, str], dict[str, str]]:
    """A catalog, a current set and a valid target set over a few services."""
    pick = st.dictionaries(st.sampled_from(NAMES), st.sampled_from(VERSIONS), min_size=1)
    current = draw(pick)
    target = {**current, **draw(pick)}
    specs = [
        spec(name, version, requires_for(draw, name, version, target), {})
        for name in NAMES
        for version in VERSIONS
    ]
    return catalog_of(*specs), current, target


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_property_every_wave_leaves_a_valid_set_ending_at_target(
    scenario: tuple[Catalog, dict[str, str], dict[str, str]],
) -> None:
    catalog, current, target = scenario
    result = plan(current, target, catalog, fleet(2), ONE)
    assert_every_wave_valid(result, catalog)
    assert sorted(s for w in result.waves for s in w.services) == list(result.changed)
    if any(w.synchronized for w in result.waves):
        assert not any(order_works(o, current, target, catalog) for o in permutations(target))


def order_works(
    order: tuple[str, ...], current: dict[str, str], target: dict[str, str], catalog: Catalog
) -> bool:
    """Brute force: switching services one by one in `order` keeps every set valid."""
    state = dict(current)
    for service in order:
        state[service] = target[service]
        if check(state, catalog):
            return False
    return True
