"""Variables in run, env, health and hooks: expansion (pure), and shell quoting proved
by running the rendered commands through the real shell."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent import health, hooks
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


HOSTILE = 'x; touch {sentinel} && echo $(touch {sentinel}) `touch {sentinel}` it\'s\n"q"'


def _hostile_values(sentinel: Path) -> dict[str, str]:
    labels = {"evil": HOSTILE.format(sentinel=sentinel), "orders_port": "8081"}
    return variables("h1", labels, "orders", "2.1.0", Path("/s/releases/2.1.0"))


def test_render_quotes_values_in_shell_fields_and_leaves_env_and_urls_raw() -> None:
    values = variables("h1", {"v": "a b; c"}, "orders", "2.1.0", Path("/s/my releases/2.1.0"))
    spec = _spec(
        run="serve --label ${meta.v} --dir ${release_dir}",
        env={"LABEL": "${meta.v}", "DIR": "${release_dir}"},
        health={"http": "http://h/${meta.v}", "tcp": "${meta.v}:1", "exec": "check ${meta.v}"},
        hooks={key: "echo ${meta.v}" for key in ("before_start", "after_start", "before_rollback")},
    )
    rendered = render(spec, values)
    assert rendered.run == "serve --label 'a b; c' --dir '/s/my releases/2.1.0'"
    assert rendered.health.exec == "check 'a b; c'"
    assert rendered.hooks.before_start == "echo 'a b; c'"
    assert rendered.hooks.after_start == "echo 'a b; c'"
    assert rendered.hooks.before_rollback == "echo 'a b; c'"
    assert rendered.env == {"LABEL": "a b; c", "DIR": "/s/my releases/2.1.0"}
    assert rendered.health.http == "http://h/a b; c"
    assert rendered.health.tcp == "a b; c:1"


def test_plain_values_are_not_decorated_with_quotes() -> None:
    rendered = render(_spec(), VALUES)
    assert rendered.run == "python server.py --host h1"  # safe characters stay bare
    assert rendered.hooks.before_start == "echo 2.1.0 > /s/releases/2.1.0/marker"


async def test_a_hostile_label_in_a_hook_runs_no_command_and_arrives_as_one_argument(
    tmp_path: Path,
) -> None:
    sentinel = tmp_path / f"pwned-{uuid.uuid4().hex}"
    values = _hostile_values(sentinel)
    spec = _spec(hooks={"before_start": "printf '[%s]\\n' ${meta.evil} ${host_id} > args.txt"})
    command = render(spec, values).hooks.before_start
    assert command is not None
    outcome = await hooks.run(command, tmp_path, {}, tmp_path / "hook.log", 10)
    assert outcome.code == 0, outcome.stderr_tail
    assert not sentinel.exists()
    assert (tmp_path / "args.txt").read_text() == f"[{values['meta.evil']}]\n[h1]\n"


async def test_a_hostile_label_in_the_run_command_and_exec_check_runs_no_command(
    tmp_path: Path,
) -> None:
    sentinel = tmp_path / f"pwned-{uuid.uuid4().hex}"
    values = _hostile_values(sentinel)
    spec = _spec(
        run="printf '%s' ${meta.evil} > run-args.txt",
        health={"exec": "test ${meta.evil} = ${meta.evil}"},
    )
    rendered = render(spec, values)
    outcome = await hooks.run(rendered.run, tmp_path, {}, tmp_path / "run.log", 10)
    assert outcome.code == 0, outcome.stderr_tail
    assert rendered.health.exec is not None
    assert await health.check_exec(rendered.health.exec, 10, tmp_path, {}) is None
    assert not sentinel.exists()
    assert (tmp_path / "run-args.txt").read_text() == values["meta.evil"]
