"""Issue 8: a label value cannot inject a command, however the spec quotes its variables.

Shell fields (`run`, hooks, `health.exec`) accept `${...}` only as a plain word, where
the agent's `shlex.quote` of the value holds; elsewhere the spec is refused at register
time and the agent refuses to render it. Also: versions are bounded like every other
identifier that becomes a path.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.interpolate import InterpolationError, render, variables
from shared.shellwords import misplaced
from shared.specs import ServiceVersion

CASES = [
    ("python s.py --port ${meta.p}", []),
    ("python s.py --port=${meta.p} --name ${host_id}", []),
    ('echo "a" ${version} "b"', []),
    ("echo \\\"${x}", []),
    ("echo 'a\\' ${x}", []),
    ('echo "name=${meta.k}"', ["meta.k"]),
    ("echo '${meta.k}'", ["meta.k"]),
    ("x $(echo ${meta.k})", ["meta.k"]),
    ("a `b ${x}`", ["x"]),
    ('echo "$(echo "${meta.k}")"', ["meta.k"]),
    ("echo \"it's ${x}\"", ["x"]),
]


@pytest.mark.parametrize(("command", "names"), CASES, ids=[c[0] for c in CASES])
def test_variables_outside_a_plain_word_are_found(command: str, names: list[str]) -> None:
    assert misplaced(command) == names


def _spec(**fields: Any) -> dict[str, Any]:
    return {
        "name": "orders", "version": "1.0.0", "artifact": "file:///srv/orders/",
        "run": "python3 server.py", "health": {"http": "http://127.0.0.1:1/health"}, **fields,
    }  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [
        {"run": 'sh -c "serve ${meta.name}"'},
        {"hooks": {"before_start": "echo '${meta.k}' > x"}},
        {"health": {"exec": "test $(cat ${release_dir}/ok)"}},
    ],
)
def test_a_spec_with_a_quoted_variable_in_a_shell_field_is_refused_naming_it(
    fields: dict[str, Any],
) -> None:
    with pytest.raises(ValidationError, match=r"stands inside quotes"):
        ServiceVersion.model_validate(_spec(**fields))


def test_quoted_variables_stay_allowed_where_no_shell_reads_them() -> None:
    spec = ServiceVersion.model_validate(
        _spec(env={"NAME": "'${meta.k}'"}, health={"http": "http://h/'${meta.k}'"})
    )
    assert spec.env["NAME"] == "'${meta.k}'"


def test_a_hostile_label_runs_nothing_and_arrives_as_one_argument(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    label = f"x; touch {marker}; $(touch {marker}) `touch {marker}` '\""
    spec = ServiceVersion.model_validate(_spec(run="printf '%s\\n' ${meta.k}"))
    values = variables("h1", {"k": label}, "orders", "1.0.0", tmp_path)
    command = render(spec, values).run
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert out.stdout == label + "\n"
    assert not marker.exists()


def test_the_agent_refuses_to_render_a_quoted_variable_registered_before_the_check(
    tmp_path: Path,
) -> None:
    spec = ServiceVersion.model_construct(**{  # as an older catalog may still hold it
        **ServiceVersion.model_validate(_spec()).__dict__, "run": 'echo "${meta.k}"'})  # fmt: skip
    with pytest.raises(InterpolationError, match=r"run: \$\{meta.k\} stands inside quotes"):
        render(spec, variables("h1", {"k": "$(reboot)"}, "orders", "1.0.0", tmp_path))


@pytest.mark.parametrize("version", ["1.0.0-" + "a" * 100, "1.0.0+" + "b" * 70])
def test_a_version_too_long_for_a_directory_name_is_refused(version: str) -> None:
    with pytest.raises(ValidationError, match="version"):
        ServiceVersion.model_validate(_spec(version=version))
