"""Bounded user input (SPEC 3.1, 7): a digest for every artifact that is not a local
directory, a size cap on TOML files, and a ceiling on durations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli.main import app
from shared.durations import MAX_SECONDS, parse_duration
from shared.errors import UserError
from shared.specs import (
    MAX_TOML_BYTES,
    Strategy,
    is_local_directory,
    load_service_version,
    read_toml,
    validate,
)

DIGEST = "ab" * 32


def _write_spec(tmp_path: Path, artifact: str, sha256: str | None) -> Path:
    lines = [
        'name = "orders"',
        'version = "2.1.0"',
        f"artifact = {json.dumps(artifact)}",
        'run = "python server.py"',
        *([f'sha256 = "{sha256}"'] if sha256 else []),
        "[health]",
        'exec = "true"',
    ]
    path = tmp_path / "orders.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "artifact",
    [
        "https://builds.example/orders-2.1.0.tar.gz",
        "https://builds.example/orders/2.1.0",  # a download, whatever its name
        "http://builds.example/orders-2.1.0.tgz",
        "file:///srv/artifacts/orders-2.1.0.tar.gz",
        "file:///srv/artifacts/orders-2.1.0.tgz",
    ],
)
def test_every_artifact_but_a_local_directory_needs_a_sha256_and_the_error_names_the_field(
    tmp_path: Path, artifact: str
) -> None:
    path = _write_spec(tmp_path, artifact, None)
    with pytest.raises(UserError) as info:
        load_service_version(path)
    assert info.value.field == f"{path}: sha256"
    assert "required" in info.value.reason
    assert load_service_version(_write_spec(tmp_path, artifact, DIGEST)).sha256 == DIGEST


@pytest.mark.parametrize("artifact", ["file:///srv/artifacts/orders/", "file:///srv/orders-2.1"])
def test_a_local_directory_may_omit_the_sha256(tmp_path: Path, artifact: str) -> None:
    assert is_local_directory(artifact)
    assert load_service_version(_write_spec(tmp_path, artifact, None)).sha256 is None


def test_register_without_a_sha256_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = _write_spec(tmp_path, "https://builds.example/orders-2.1.0.tar.gz", None)
    result = CliRunner().invoke(app, ["register", str(path)])
    assert result.exit_code == 2, result.output
    assert "sha256: required" in result.output


def test_a_toml_file_over_the_cap_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_bytes(b"# " + b"x" * MAX_TOML_BYTES + b"\n")
    size = path.stat().st_size
    with pytest.raises(UserError) as info:
        read_toml(path)
    assert info.value.field == str(path)
    assert info.value.reason == f"file is {size} bytes; the limit is {MAX_TOML_BYTES}"


def test_a_toml_file_at_the_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    body = b'key = "value"\n'
    path.write_bytes(body + b"#" * (MAX_TOML_BYTES - len(body) - 1) + b"\n")
    assert path.stat().st_size == MAX_TOML_BYTES
    assert read_toml(path) == {"key": "value"}


def test_a_device_without_a_size_is_still_read_only_up_to_the_cap() -> None:
    with pytest.raises(UserError, match=f"the limit is {MAX_TOML_BYTES}"):
        read_toml(Path("/dev/zero"))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("168h", 7 * 24 * 3600.0), (MAX_SECONDS, float(MAX_SECONDS)), ("2s", 2.0)],
)
def test_durations_up_to_seven_days_are_accepted(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["169h", MAX_SECONDS + 1, "604801s", "99999999999999m"])
def test_durations_over_seven_days_are_refused_naming_the_limit(value: object) -> None:
    with pytest.raises(ValueError, match=f"limit of {MAX_SECONDS}s"):
        parse_duration(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_durations_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


def test_a_strategy_with_a_bake_over_the_limit_names_the_field() -> None:
    with pytest.raises(UserError) as info:
        validate(Strategy, {"bake": "200h"}, "release.toml: strategy.")
    assert info.value.field == "release.toml: strategy.bake"
    assert "limit" in info.value.reason
