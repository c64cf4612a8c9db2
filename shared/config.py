"""Settings from `LOCKSTEP_*` environment variables, one small object per concern."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.durations import Duration


class BrokerSettings(BaseSettings):
    """How to reach RabbitMQ."""

    model_config = SettingsConfigDict(env_prefix="LOCKSTEP_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """The broker URL (LOCKSTEP_AMQP_URL); a cluster's nodes as a comma-separated list:
    connections go to the first node that is up, and move to the next when lost."""
    agent_queue_type: Literal["quorum", "classic"] = "quorum"
    """`classic` for single-node brokers serving very many agents (SPEC 5)."""
    prefetch: int = Field(default=100, ge=1)
    """Unacked deliveries per consumer; 100-300 is what RabbitMQ recommends."""
    connect_timeout: Duration = 10.0
    """How long a process waits for the broker before giving up."""
    request_timeout: Duration = 15.0
    """How long the CLI waits for the coordinator's reply (then exit code 3)."""
    reconnect_interval: Duration = 1.0
    """Pause between reconnection attempts after the broker went away."""
    publish_retry: Duration = 30.0
    """How long a publish keeps re-sending through a broker outage before failing."""
    max_message_bytes: int = Field(default=1 << 20, ge=1024)
    """Deliveries larger than this are dead-lettered before they are parsed."""
    tls_ca: str | None = None
    """`amqps://` only: PEM CA bundle that verifies the broker (default: the system store)."""
    tls_cert: str | None = None
    """`amqps://` only: PEM client certificate (chain) presented to the broker; optional."""
    tls_key: str | None = None
    """`amqps://` only: the client certificate's PEM private key (default: in `tls_cert`)."""


class SecuritySettings(BaseSettings):
    """Signing and freshness of messages (SPEC 7); both sides read the same variables."""

    model_config = SettingsConfigDict(env_prefix="LOCKSTEP_", extra="ignore")

    coordinator_key: str | None = None
    """Agents: path of the coordinator's public key (`coordinator.pub`); required."""
    command_ttl: Duration = 300.0
    """How long after it was sent a command may still be executed (`expires_at`)."""
    clock_skew: Duration = 30.0
    """How far apart clocks may be: allowed past a command's expiry, and before a
    report's `sent_at` counts as from the future."""
    agent_users: Literal["per-host", "shared"] = "per-host"
    """Coordinator: `per-host` accepts a report only with `user_id` lockstep-agent-<host>
    (set by `lockstep broker add-agent`); `shared` lets agents share a broker user
    (labs, tests: the broker then cannot stop one agent posing as another)."""


class HeartbeatSettings(BaseSettings):
    """The heartbeat period, the one timer both sides must agree on (base of the two below)."""

    model_config = SettingsConfigDict(env_prefix="LOCKSTEP_", extra="ignore")

    heartbeat_interval: Duration = 2.0
    """How often agents report what they run (LOCKSTEP_HEARTBEAT_INTERVAL, same on both sides)."""


class CoordinatorSettings(HeartbeatSettings):
    """The coordinator's protocol timers."""

    lost_after_missed: int = Field(default=3, ge=1)
    """Missed heartbeats after which an agent counts as lost."""
    max_heartbeats_per_second: float = Field(default=150.0, gt=0)
    """The most heartbeats a second the fleet sends the coordinator: agents of a fleet
    larger than this x heartbeat_interval are told to beat less often (coordinator.pace;
    Nomad's max_heartbeats_per_second)."""
    auto_rollback_window: Duration = 900.0
    """How long after a release completed an alert may still roll it back."""
    alert_min_severity: Literal["info", "warning", "error", "critical"] = "critical"
    """Alerts below this severity are recorded and ignored."""
    lease_ttl: Duration = Field(default=3.0, ge=0.5)
    """How long the active coordinator's lease lasts unrenewed (it renews it three times
    as often): a standby sharing the store takes over this long after the active one
    died, so it bounds the takeover (LOCKSTEP_LEASE_TTL; coordinator.lease)."""

    @property
    def lost_after(self) -> float:
        """Seconds of silence after which a host beating every heartbeat_interval is lost."""
        return self.lost_after_for(None)

    def lost_after_for(self, interval: float | None) -> float:
        """Seconds of silence after which a host that beats every `interval` seconds
        (None: heartbeat_interval) is lost."""
        return (interval or self.heartbeat_interval) * self.lost_after_missed


class AgentSettings(HeartbeatSettings):
    """The agent's behaviour on its host."""

    keep_releases: int = Field(default=5, ge=1)
    """Release dirs kept per service (never the running or a prepared one)."""
    stop_grace: Duration = 10.0
    """SIGTERM to SIGKILL grace when stopping a service."""
    hook_timeout: Duration = 300.0
    """How long a hook (before_start, after_start, before_rollback) may run."""
    crash_loop_exits: int = Field(default=3, ge=1)
    """Unexpected exits within `crash_loop_window` that make a crash loop."""
    crash_loop_window: Duration = 60.0
    """The window in which `crash_loop_exits` exits count as a crash loop."""
    artifact_max_bytes: int = Field(default=2 << 30, ge=1)
    """Cap of an artifact's download and, separately, of its unpacked files (2 GiB)."""
    artifact_max_members: int = Field(default=100_000, ge=1)
    """Cap of the files, dirs and links in an artifact archive."""
    download_timeout: Duration = 300.0
    """Overall deadline of one artifact download (not a per-read timeout)."""
