"""`${...}` variables in a service version's run, env, health and hooks (SPEC 3.1).

The agent's steps call `render` when they prepare (to refuse a spec that cannot be
rendered on this host before voting) and when they start a service. Known variables:
`${host_id}`, `${service}`, `${version}`, `${release_dir}` and `${meta.KEY}` (the
agent's label KEY); anything else raises `InterpolationError` naming the variable.

`run`, `hooks.*` and `health.exec` are run by a shell (agent.driver, agent.hooks,
agent.health), so a value substituted there is `shlex.quote`d: a label such as
`x; rm -rf /` arrives as one argument, never as shell syntax. `env` values and the
http/tcp checks are not shell text and get the raw value.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from shared.errors import PermanentError
from shared.shellwords import misplaced
from shared.specs import ServiceVersion

_VARIABLE = re.compile(r"\$\{([^}]*)\}")


class InterpolationError(PermanentError):
    """A `${...}` variable that is not known on this host (or stands where quoting it
    would not protect the command)."""

    def __init__(self, where: str, name: str, context: str = "") -> None:
        what = f"${{{name}}} {context}" if context else f"unknown variable ${{{name}}}"
        super().__init__(f"{where}: {what}")
        self.where = where
        self.name = name


def variables(
    host_id: str, labels: Mapping[str, str], service: str, version: str, release_dir: Path
) -> dict[str, str]:
    """The variables a service version may use on this host."""
    found = {
        "host_id": host_id,
        "service": service,
        "version": version,
        "release_dir": str(release_dir),
    }
    found.update({f"meta.{key}": value for key, value in labels.items()})
    return found


def expand(text: str, values: Mapping[str, str], where: str, *, shell: bool = False) -> str:
    """`text` with every `${name}` replaced; `InterpolationError` on an unknown name.

    With `shell`, each value is quoted for a POSIX shell (`text` is a command line).
    """

    if shell and (names := misplaced(text)):  # a spec registered before the check
        raise InterpolationError(where, names[0], "stands inside quotes, $(...) or backticks")

    def replace(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name not in values:
            raise InterpolationError(where, name)
        return shlex.quote(values[name]) if shell else values[name]

    return _VARIABLE.sub(replace, text)


def _maybe(
    text: str | None, values: Mapping[str, str], where: str, *, shell: bool = False
) -> str | None:
    return None if text is None else expand(text, values, where, shell=shell)


def render(spec: ServiceVersion, values: Mapping[str, str]) -> ServiceVersion:
    """`spec` with run, env, health checks and hooks expanded (shell text quoted)."""
    health = spec.health.model_copy(
        update={
            name: _maybe(getattr(spec.health, name), values, f"health.{name}", shell=shell)
            for name, shell in (("http", False), ("tcp", False), ("exec", True))
        }
    )
    hooks = spec.hooks.model_copy(
        update={
            name: _maybe(getattr(spec.hooks, name), values, f"hooks.{name}", shell=True)
            for name in ("before_start", "after_start", "before_rollback")
        }
    )
    env = {key: expand(value, values, f"env.{key}") for key, value in spec.env.items()}
    run = expand(spec.run, values, "run", shell=True)
    return spec.model_copy(update={"run": run, "env": env, "health": health, "hooks": hooks})
