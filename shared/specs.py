"""The files users write (SPEC 3): service versions, release files and strategies.

Both sides use these models: the CLI and coordinator validate them, and a prepare
command carries the whole `ServiceVersion` so the agent needs no catalog of its own.
`load_*` functions turn a TOML file into a model or raise `UserError` naming the field.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.durations import Duration
from shared.errors import UserError
from shared.shellwords import misplaced
from shared.versions import parse_constraint, parse_version

NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""A service name: also a directory name on every host, so no `/` and no leading dot."""
HOST = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""A host id (an agent's identity and part of its queue and broker-user names)."""
VERSION = r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}$"
"""A version as text: also a directory name on every host (and semver on top)."""
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
MAX_TOML_BYTES = 1 << 20
"""The largest TOML file `read_toml` reads (1 MiB): a spec is a page, not a data set."""


def _plain_variables(command: str) -> str:
    """Refuse `${...}` inside quotes, `$(...)` or backticks of a shell command: there the
    agent's quoting of the value would be undone (shared/shellwords.py)."""
    names = misplaced(command)
    if names:
        raise ValueError(
            f"${{{names[0]}}} stands inside quotes, $(...) or backticks; write it as a "
            "plain word: lockstep shell-quotes every substituted value itself"
        )
    return command


ShellCommand = Annotated[str, AfterValidator(_plain_variables)]
"""A command run through a shell (`run`, hooks, `health.exec`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthSpec(_Strict):
    """How the agent decides a service is healthy (at least one of http/tcp/exec)."""

    http: str | None = None
    tcp: str | None = None
    exec: ShellCommand | None = None
    interval: Duration = 1.0
    timeout: Duration = 2.0
    healthy_after: int = Field(default=3, ge=1)
    start_deadline: Duration = 30.0

    @model_validator(mode="after")
    def _one_check(self) -> HealthSpec:
        if not (self.http or self.tcp or self.exec):
            raise ValueError("at least one of http, tcp or exec is required")
        return self


class Hooks(_Strict):
    """Optional shell commands run in the release dir."""

    before_start: ShellCommand | None = None
    after_start: ShellCommand | None = None
    before_rollback: ShellCommand | None = None


class ServiceVersion(_Strict):
    """One immutable build of a service (SPEC 3.1)."""

    name: str = Field(pattern=NAME)
    version: str = Field(pattern=VERSION)
    artifact: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", validate_default=True)
    requires: dict[str, str] = Field(default_factory=dict)
    hosts: dict[str, str] = Field(default_factory=dict)
    run: ShellCommand
    env: dict[str, str] = Field(default_factory=dict)
    health: HealthSpec
    hooks: Hooks = Field(default_factory=Hooks)

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        parse_version(value)
        return value

    @field_validator("requires")
    @classmethod
    def _constraints(cls, value: dict[str, str]) -> dict[str, str]:
        for constraint in value.values():
            parse_constraint(constraint)
        return value

    @field_validator("artifact")
    @classmethod
    def _artifact_url(cls, value: str) -> str:
        if not re.match(r"^(file|https?)://", value):
            raise ValueError("must be a file://, http:// or https:// URL")
        return value

    @field_validator("sha256")
    @classmethod
    def _archive_digest(cls, value: str | None, info: ValidationInfo) -> str | None:
        artifact = info.data.get("artifact")  # absent when the artifact itself is invalid
        if value is None and artifact is not None and not is_local_directory(artifact):
            raise ValueError(
                "required for every artifact except a local directory "
                "(a file:// URL not ending in .tar.gz or .tgz)"
            )
        return value

    @model_validator(mode="after")
    def _not_self(self) -> ServiceVersion:
        if self.name in self.requires:
            raise ValueError("a service cannot require itself")
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)


def is_local_directory(artifact: str) -> bool:
    """Whether `artifact` names a directory on the agent's disk, judged by the URL alone.

    The coordinator validates specs without the agent's filesystem: a `file://` URL is
    a directory unless it names an archive; every http(s) artifact is a download.
    """
    return artifact.startswith("file://") and not artifact.endswith(ARCHIVE_SUFFIXES)


Percent = str | int


class Strategy(_Strict):
    """How a deployment rolls out (SPEC 3.2); every key is also a `deploy` flag."""

    max_parallel: Percent = "100%"
    max_parallel_prepare: Percent = "100%"
    """Prepares in flight at once (each fetches one artifact): a count or a percentage
    of the deployment's participants; the next goes out as soon as one votes."""
    canary: int = Field(default=0, ge=0)
    canary_bake: Duration = 0.0
    bake: Duration = 0.0
    rollback_scope: Literal["dependents", "all"] = "dependents"
    allow_unavailable: int = Field(default=0, ge=0)
    prepare_timeout: Duration = 30.0
    commit_timeout: Duration = 120.0

    @field_validator("max_parallel", "max_parallel_prepare")
    @classmethod
    def _parallel(cls, value: Percent) -> Percent:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("must be at least 1")
            return value
        match = re.match(r"^\s*(\d+)\s*(%?)\s*$", value)
        if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(1)) > 100):
            raise ValueError(f"{value!r} is not a host count or a percentage such as '50%'")
        return value if match.group(2) else int(match.group(1))

    def batch_size(self, hosts: int) -> int:
        """Hosts per batch for a wave of `hosts` hosts."""
        return _share(self.max_parallel, hosts)

    def prepare_size(self, participants: int) -> int:
        """Prepares in flight at once for a deployment of `participants` participants."""
        return _share(self.max_parallel_prepare, participants)


def _share(limit: Percent, total: int) -> int:
    """`limit` (a count, or a percentage of `total`) as a count: at least 1."""
    if isinstance(limit, int):
        return max(1, limit)
    percent = int(limit.strip().rstrip("%"))
    return max(1, (total * percent) // 100)


class ReleaseFile(_Strict):
    """`lockstep deploy --file release.toml` (SPEC 3.2)."""

    services: dict[str, str]
    strategy: Strategy = Field(default_factory=Strategy)

    @field_validator("services")
    @classmethod
    def _versions(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("names no service")
        for version in value.values():
            parse_version(version)
        return value


def field_of(error: ValidationError) -> tuple[str, str]:
    """The dotted field path and the reason of the first error in `error`."""
    first = error.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    return path, reason


def validate(model: type[BaseModel], data: Any, where: str = "") -> Any:
    """`model` built from `data`, or `UserError` naming `where` and the field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        path, reason = field_of(e)
        raise UserError(f"{where}{path}" if path else where.rstrip(": "), reason) from e


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at `path`, or `UserError` naming the file and the reason.

    The size is checked before a byte is read, and the read itself is bounded too (a
    pipe or device reports no size).
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = b"" if size > MAX_TOML_BYTES else f.read(MAX_TOML_BYTES + 1)
    except FileNotFoundError as e:
        raise UserError(str(path), "no such file") from e
    except OSError as e:
        raise UserError(str(path), f"cannot read: {e.strerror or e}") from e
    size = max(size, len(data))
    if size > MAX_TOML_BYTES:
        raise UserError(str(path), f"file is {size} bytes; the limit is {MAX_TOML_BYTES}")
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"not valid TOML: {e}") from e


def load_service_version(path: Path) -> ServiceVersion:
    """The service version described by the TOML file at `path`."""
    result: ServiceVersion = validate(ServiceVersion, read_toml(path), f"{path}: ")
    return result


def load_release_file(path: Path) -> ReleaseFile:
    """The release file at `path`."""
    result: ReleaseFile = validate(ReleaseFile, read_toml(path), f"{path}: ")
    return result
