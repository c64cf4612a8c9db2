"""Tier (a): the resolver's checks and errors, table-driven, no I/O."""

from __future__ import annotations

import pytest

from coordinator.resolver import Catalog, Violation, check, resolve
from shared.errors import UserError
from shared.specs import ServiceVersion


def sv(name: str, version: str, **requires: str) -> ServiceVersion:
    return ServiceVersion(
        name=name,
        version=version,
        artifact=f"file:///srv/{name}-{version}",
        run="python server.py",
        health={"exec": "true"},
        requires=requires,
    )


def catalog_of(*specs: ServiceVersion) -> Catalog:
    return {s.key: s for s in specs}


CATALOG = catalog_of(
    sv("payments", "1.0.0"),
    sv("payments", "1.5.0"),
    sv("payments", "2.0.0"),
    sv("orders", "1.0.0", payments=">=1.0.0"),
    sv("orders", "2.0.0", payments=">=1.5.0"),
    sv("web", "1.0.0", orders=">=1.0.0, <3.0.0", payments="!=1.5.0"),
)


@pytest.mark.parametrize(
    ("current", "requested", "expected"),
    [
        pytest.param(
            {"orders": "1.0.0", "payments": "1.0.0"},
            {"payments": "1.5.0", "orders": "2.0.0"},
            {"orders": "2.0.0", "payments": "1.5.0"},
            id="both-requested",
        ),
        pytest.param(
            {"orders": "1.0.0", "payments": "1.5.0"},
            {"orders": "2.0.0"},
            {"orders": "2.0.0", "payments": "1.5.0"},
            id="unnamed-service-keeps-current",
        ),
        pytest.param({}, {"payments": "1.0.0"}, {"payments": "1.0.0"}, id="new-service"),
        pytest.param(
            {"orders": "1.0.0", "payments": "1.0.0"},
            {"web": "1.0.0"},
            {"orders": "1.0.0", "payments": "1.0.0", "web": "1.0.0"},
            id="several-constraints-hold",
        ),
    ],
)
def test_resolve_returns_current_updated_with_requested(
    current: dict[str, str], requested: dict[str, str], expected: dict[str, str]
) -> None:
    assert resolve(current, requested, CATALOG) == expected


@pytest.mark.parametrize(
    ("current", "requested", "field", "words"),
    [
        pytest.param(
            {"payments": "1.0.0"},
            {"payments": "9.9.9"},
            "services.payments",
            ["version 9.9.9 is not registered"],
            id="unknown-version",
        ),
        pytest.param(
            {},
            {"billing": "1.0.0"},
            "services.billing",
            ["version 1.0.0 is not registered"],
            id="unknown-service",
        ),
        pytest.param(
            {"orders": "1.0.0", "payments": "1.0.0"},
            {"orders": "2.0.0"},
            "services.orders",
            ["orders", "2.0.0", ">=1.5.0", "payments 1.0.0"],
            id="consumer-needs-newer-provider",
        ),
        pytest.param(
            {},
            {"orders": "1.0.0"},
            "services.orders",
            ["orders 1.0.0 requires payments >=1.0.0", "payments is not in the set"],
            id="provider-missing",
        ),
        pytest.param(
            {"orders": "1.0.0", "payments": "1.0.0", "web": "1.0.0"},
            {"payments": "1.5.0"},
            "services.web",
            ["web", "!=1.5.0", "payments 1.5.0"],
            id="provider-upgrade-breaks-unchanged-consumer",
        ),
    ],
)
def test_resolve_refuses_naming_field_constraint_and_breaking_version(
    current: dict[str, str], requested: dict[str, str], field: str, words: list[str]
) -> None:
    with pytest.raises(UserError) as caught:
        resolve(current, requested, CATALOG)
    assert caught.value.field == field
    for word in words:
        assert word in caught.value.reason


def test_check_reports_every_violation_sorted() -> None:
    found = check({"orders": "2.0.0", "web": "1.0.0", "payments": "1.5.0"}, CATALOG)
    assert found == [Violation("web", "1.0.0", "payments", "!=1.5.0", "1.5.0")]
    found = check({"orders": "2.0.0", "web": "1.0.0"}, CATALOG)
    assert [(v.service, v.requires, v.found) for v in found] == [
        ("orders", "payments", None),
        ("web", "payments", None),
    ]


def test_check_accepts_an_empty_set() -> None:
    assert check({}, CATALOG) == []


def test_violation_describe_names_both_sides() -> None:
    violation = Violation("orders", "2.0.0", "payments", ">=1.5.0", "1.0.0")
    assert violation.describe() == (
        "orders 2.0.0 requires payments >=1.5.0 but the set has payments 1.0.0"
    )
