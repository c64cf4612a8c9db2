"""Variables in run, env, health and hooks (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.interpolate import InterpolationError, expand, render, variables
from shared.specs import ServiceVersion

VALUES = variables("h1", {"orders_port": "8081"}, "orders", "2.1.0", Path("/s/releases/2.1.0"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${host_id}", "h1"),
        ("${service}-${version}", "orders-2.1.0"),
        ("cd ${release_dir} && run", "cd /s/releases/2.1.0 && run"),
        ("http://127.0.0.1:${meta.orders_port}/health", "http://127.0.0.1:8081/health"),
        ("no variables, $HOME stays", "no variables, $HOME stays"),
    ],
)
def test_expand_known_variables(text: str, expected: str) -> None:
    assert expand(text, VALUES, "run") == expected


@pytest.mark.parametrize("name", ["meta.missing", "nope", ""])
def test_unknown_variable_names_it(name: str) -> None:
    with pytest.raises(InterpolationError) as info:
        expand(f"x ${{{name}}} y", VALUES, "env.PORT")
    assert f"${{{name}}}" in str(info.value)
    assert "env.PORT" in str(info.value)


def _spec(**fields: object) -> ServiceVersion:
    base: dict[str, object] = {
        "name": "orders",
        "version": "2.1.0",
        "artifact": "file:///a/orders",
        "run": "python server.py --host ${host_id}",
        "env": {"PORT": "${meta.orders_port}"},
        "health": {"http": "http://127.0.0.1:${meta.orders_port}/health", "exec": "test -d ."},
        "hooks": {"before_start": "echo ${version} > ${release_dir}/marker"},
    }
    base.update(fields)
    return ServiceVersion.model_validate(base)


def test_render_expands_every_field() -> None:
    rendered = render(_spec(), VALUES)
    assert rendered.run == "python server.py --host h1"
    assert rendered.env == {"PORT": "8081"}
    assert rendered.health.http == "http://127.0.0.1:8081/health"
    assert rendered.health.exec == "test -d ."
    assert rendered.health.tcp is None
    assert rendered.hooks.before_start == "echo 2.1.0 > /s/releases/2.1.0/marker"


def test_render_refuses_unknown_label_in_health() -> None:
    spec = _spec(health={"tcp": "127.0.0.1:${meta.other_port}"})
    with pytest.raises(InterpolationError, match=r"health\.tcp.*\$\{meta\.other_port\}"):
        render(spec, VALUES)
