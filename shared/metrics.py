"""Prometheus metrics of a lockstep process, served on `--metrics-port`.

prometheus-client is used rather than hand-written exposition: it gets the text
format, registries and the HTTP endpoint right.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

DEAD_LETTERED = Counter(
    "lockstep_messages_dead_lettered_total", "Messages rejected to lockstep.dead", ["queue"]
)
REFUSED = Counter(
    "lockstep_messages_refused_total",
    "Messages dead-lettered, by reason (bad_signature, expired, wrong_host, replayed, ...)",
    ["reason"],
)
IGNORED = Counter(
    "lockstep_reports_ignored_total",
    "Agent reports dropped because the agent's key is not approved",
    ["why"],
)
HANDLED = Counter("lockstep_messages_handled_total", "Messages handled and acked", ["kind"])
DEPLOYMENTS = Counter(
    "lockstep_deployments_finished_total", "Deployments that ended, by outcome", ["state"]
)
STEPS = Counter("lockstep_agent_steps_total", "Protocol steps executed by an agent", ["step", "ok"])
AGENTS_ALIVE = Gauge("lockstep_agents_alive", "Agents whose heartbeat is current")


def serve(port: int | None) -> None:
    """Expose the metrics on 127.0.0.1-wide `port` (nothing when None)."""
    if port is not None:
        start_http_server(port)
