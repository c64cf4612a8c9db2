"""Release dirs: staging, promotion, the atomic `current` switch and GC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.releases import Releases
from shared.specs import ServiceVersion


def _spec(version: str) -> ServiceVersion:
    return ServiceVersion.model_validate(
        {
            "name": "demo",
            "version": version,
            "artifact": f"file:///a/demo-{version}",
            "run": "true",
            "health": {"exec": "true"},
        }
    )


def _release(releases: Releases, version: str, deployment_id: str = "") -> Path:
    spec = _spec(version)
    staged = releases.staging_dir("demo", deployment_id or f"d-{version}")
    staged.mkdir(parents=True)
    (staged / "VERSION").write_text(version)
    releases.mark(staged, spec)
    return releases.promote(spec, deployment_id or f"d-{version}")


def test_promote_moves_staging_into_releases(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    target = _release(releases, "1.0.0")
    assert target == tmp_path / "services" / "demo" / "releases" / "1.0.0"
    assert (target / "VERSION").read_text() == "1.0.0"
    assert releases.is_intact(_spec("1.0.0"))
    assert not releases.staging_dir("demo", "d-1.0.0").exists()


def test_promote_of_an_intact_release_discards_the_staged_copy(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    _release(releases, "1.0.0")
    staged = releases.staging_dir("demo", "again")
    staged.mkdir(parents=True)
    releases.promote(_spec("1.0.0"), "again")
    assert not staged.exists()


def test_switch_is_a_symlink_replaced_atomically(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    for version in ("1.0.0", "1.1.0"):
        _release(releases, version)
    releases.switch("demo", "1.0.0")
    link = releases.current_link("demo")
    assert link.is_symlink()
    assert link.resolve() == releases.release_dir("demo", "1.0.0").resolve()
    inode_before = os.lstat(link).st_ino
    releases.switch("demo", "1.1.0")
    assert releases.current_version("demo") == "1.1.0"
    assert os.lstat(link).st_ino != inode_before  # a new link renamed over the old one
    assert [p.name for p in link.parent.iterdir() if p.name.startswith(".current")] == []
    releases.remove_current("demo")
    assert releases.current_version("demo") is None


def test_gc_keeps_the_newest_and_never_running_or_prepared(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    versions = [f"1.{i}.0" for i in range(6)]
    for version in versions:
        _release(releases, version)
    releases.switch("demo", "1.0.0")  # the oldest runs
    removed = releases.gc("demo", keep=3, protect={"1.1.0"})  # a prepared txn needs 1.1.0
    assert removed == ["1.2.0", "1.3.0", "1.4.0"]
    assert releases.versions("demo") == ["1.0.0", "1.1.0", "1.5.0"]


def test_discard_removes_staging_and_download(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    staged = releases.staging_dir("demo", "d1")
    staged.mkdir(parents=True)
    releases.download_path("demo", "d1").write_bytes(b"partial")
    releases.discard("demo", "d1")
    assert not staged.exists()
    assert not releases.download_path("demo", "d1").exists()
    releases.discard("demo", "never-staged")


def test_promotion_records_a_manifest_beside_the_release_dir(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    target = _release(releases, "1.0.0")
    sidecar = releases.manifest_file("demo", "1.0.0")
    assert sidecar.parent == target.parent
    assert sidecar.name == ".1.0.0.manifest.json"
    assert sorted(os.listdir(target)) == [".lockstep-release.json", "VERSION"]
    assert releases.versions("demo") == ["1.0.0"]  # the sidecar is not a release


@pytest.mark.parametrize(
    ("change", "intact"),
    [
        ("nothing", True),
        ("add a file", True),  # a service or hook writing into its cwd (__pycache__, markers)
        ("change a file", False),
        ("remove a file", False),
        ("retarget a symlink", False),
        ("replace a file by a symlink", False),
        ("remove the manifest", False),  # a release promoted before manifests existed
        ("corrupt the manifest", False),
    ],
)
def test_is_intact_checks_the_release_against_its_manifest(
    tmp_path: Path, change: str, intact: bool
) -> None:
    releases = Releases(tmp_path)
    spec = _spec("1.0.0")
    staged = releases.staging_dir("demo", "d1")
    (staged / "lib").mkdir(parents=True)
    (staged / "VERSION").write_text("1.0.0")
    (staged / "lib" / "code.py").write_text("print('hi')\n")
    (staged / "entry").symlink_to("lib/code.py")
    releases.mark(staged, spec)
    target = releases.promote(spec, "d1")
    assert releases.is_intact(spec)
    sidecar = releases.manifest_file("demo", "1.0.0")
    if change == "add a file":
        (target / "lib" / "__pycache__").mkdir()
        (target / "lib" / "__pycache__" / "code.pyc").write_bytes(b"\0")
    elif change == "change a file":
        (target / "lib" / "code.py").write_text("print('owned')\n")
    elif change == "remove a file":
        (target / "VERSION").unlink()
    elif change == "retarget a symlink":
        (target / "entry").unlink()
        (target / "entry").symlink_to("VERSION")
    elif change == "replace a file by a symlink":
        (target / "VERSION").unlink()
        (target / "VERSION").symlink_to("lib/code.py")
    elif change == "remove the manifest":
        sidecar.unlink()
    elif change == "corrupt the manifest":
        sidecar.write_text("{")
    assert releases.is_intact(spec) is intact


def test_gc_removes_the_manifest_with_its_release(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    for version in ("1.0.0", "1.1.0"):
        _release(releases, version)
    assert releases.gc("demo", keep=1, protect=()) == ["1.0.0"]
    assert not releases.manifest_file("demo", "1.0.0").exists()
    assert releases.manifest_file("demo", "1.1.0").exists()
