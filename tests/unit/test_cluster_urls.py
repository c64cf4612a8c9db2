"""Issue 10: LOCKSTEP_AMQP_URL as a comma-separated list of a cluster's nodes (pure)."""

from __future__ import annotations

from shared.transport.cluster import split, with_default
from shared.transport.connection import safe_url, user_of


def test_a_list_of_nodes_is_split_in_order_and_blanks_are_ignored() -> None:
    assert split(" amqp://a/v , amqp://b/v,,") == ["amqp://a/v", "amqp://b/v"]


def test_the_coordinators_heartbeat_is_added_only_where_a_url_sets_none() -> None:
    urls = "amqp://u:p@h1:5672/v,amqp://h2/v?heartbeat=9"
    assert with_default(urls, "heartbeat", "6") == (
        "amqp://u:p@h1:5672/v?heartbeat=6,amqp://h2/v?heartbeat=9"
    )


def test_errors_show_every_node_without_credentials_and_the_user_is_the_first_nodes() -> None:
    urls = "amqp://alice:secret@h1/v,amqp://alice:secret@h2/v"
    assert safe_url(urls) == "h1/v,h2/v"
    assert user_of(urls) == "alice"
