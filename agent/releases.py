"""Release dirs on this host (SPEC 6.6): layout, atomic `current` switch, staging, GC.

    <state_dir>/services/<name>/releases/<version>/    unpacked, immutable releases
    <state_dir>/services/<name>/current                symlink to releases/<version>
    <state_dir>/services/<name>/staging/<deployment>/  prepared but not committed
    <state_dir>/services/<name>/logs/<version>.log     the service's stdout/stderr
    <state_dir>/services/<name>/releases/.<version>.manifest.json   what it held

Used by the agent's steps and supervisor; pure filesystem work, no asyncio. Every method
that touches the disk blocks (removing or hashing a release takes long, a switch
fsyncs): callers on the event loop run it in a worker thread (`asyncio.to_thread`).

A release is intact when its marker file records the artifact and digest it was built
from AND its files still match the manifest recorded when it was promoted
(`agent.manifest`); a release without a manifest (promoted by an older agent) is not
intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Collection
from pathlib import Path

from agent import manifest
from shared import log
from shared.specs import ServiceVersion

MARKER = ".lockstep-release.json"
_log = log.get("agent.releases")


class Releases:
    """The release dirs of every service under one state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir.resolve() / "services"
        """Absolute and resolved once, so the paths built from it (`${release_dir}`)
        are too, with no filesystem call each time."""

    def service_dir(self, name: str) -> Path:
        return self.root / name

    def release_dir(self, name: str, version: str) -> Path:
        return self.root / name / "releases" / version

    def staging_dir(self, name: str, deployment_id: str) -> Path:
        return self.root / name / "staging" / deployment_id

    def download_path(self, name: str, deployment_id: str) -> Path:
        return self.root / name / "staging" / f".{deployment_id}.download"

    def current_link(self, name: str) -> Path:
        return self.root / name / "current"

    def log_file(self, name: str, version: str) -> Path:
        return self.root / name / "logs" / f"{version}.log"

    def manifest_file(self, name: str, version: str) -> Path:
        """The sidecar manifest of releases/<version> (outside the release dir)."""
        return self.root / name / "releases" / f".{version}.manifest.json"

    # --- staging ----------------------------------------------------------------

    def mark(self, tree: Path, spec: ServiceVersion) -> None:
        """Record in `tree` what it was built from (makes it an intact release)."""
        marker = {"artifact": spec.artifact, "sha256": spec.sha256, "version": spec.version}
        (tree / MARKER).write_text(json.dumps(marker))

    def is_intact(self, spec: ServiceVersion) -> bool:
        """Whether releases/<version> was built from `spec`'s artifact and is unchanged."""
        release = self.release_dir(spec.name, spec.version)
        try:
            recorded = json.loads((release / MARKER).read_text())
            held = manifest.Manifest.from_json(
                self.manifest_file(spec.name, spec.version).read_text()
            )
        except (OSError, ValueError):
            return False
        if spec.sha256 is not None:
            if recorded.get("sha256") != spec.sha256:
                return False
        elif recorded.get("artifact") != spec.artifact:
            return False
        found = manifest.problems(release, held)
        if found:
            _log.warning("release.tampered", service=spec.name, version=spec.version,
                         problems=found[:5])  # fmt: skip
        return not found

    def promote(self, spec: ServiceVersion, deployment_id: str) -> Path:
        """Move staging/<deployment_id> to releases/<version> (kept if already intact)."""
        staged = self.staging_dir(spec.name, deployment_id)
        target = self.release_dir(spec.name, spec.version)
        if self.is_intact(spec):
            self.discard(spec.name, deployment_id)
        elif staged.is_dir():
            if target.exists():
                shutil.rmtree(target)
            self.manifest_file(spec.name, spec.version).unlink(missing_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            self._record_manifest(spec.name, spec.version)
        else:
            raise FileNotFoundError(f"neither {target} nor {staged} holds release {spec.version}")
        os.utime(target / MARKER)  # promotion time orders releases for GC
        return target

    def _record_manifest(self, name: str, version: str) -> None:
        """Write the manifest of releases/<version> next to it (atomically)."""
        held = manifest.build(self.release_dir(name, version), skip=frozenset({MARKER}))
        path = self.manifest_file(name, version)
        temp = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
        with temp.open("w") as f:
            f.write(held.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)

    def discard(self, name: str, deployment_id: str) -> None:
        """Remove what a deployment staged for `name` (nothing staged is fine)."""
        shutil.rmtree(self.staging_dir(name, deployment_id), ignore_errors=True)
        self.download_path(name, deployment_id).unlink(missing_ok=True)

    # --- current ----------------------------------------------------------------

    def switch(self, name: str, version: str) -> str | None:
        """Point `current` at releases/<version> atomically (rename over it); the
        version it pointed at before (None: none)."""
        previous = self.current_version(name)
        link = self.current_link(name)
        temp = link.with_name(f".current.{uuid.uuid4().hex}")
        os.symlink(os.path.join("releases", version), temp)
        os.replace(temp, link)
        _fsync_dir(link.parent)
        return previous

    def current_version(self, name: str) -> str | None:
        try:
            return Path(os.readlink(self.current_link(name))).name
        except OSError:
            return None

    def remove_current(self, name: str) -> None:
        self.current_link(name).unlink(missing_ok=True)
        _fsync_dir(self.service_dir(name))

    # --- garbage collection -----------------------------------------------------

    def versions(self, name: str) -> list[str]:
        """Release versions of `name`, oldest promotion first."""
        base = self.root / name / "releases"
        if not base.is_dir():
            return []
        dirs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return [d.name for d in sorted(dirs, key=_promoted_at)]

    def gc(self, name: str, keep: int, protect: Collection[str]) -> list[str]:
        """Remove the oldest releases beyond `keep`, never those in `protect`."""
        versions = self.versions(name)
        protected = set(protect)
        current = self.current_version(name)
        if current is not None:
            protected.add(current)
        removable = [v for v in versions if v not in protected]
        excess = len(versions) - keep
        removed = removable[: max(0, excess)]
        for version in removed:
            shutil.rmtree(self.release_dir(name, version), ignore_errors=True)
            self.manifest_file(name, version).unlink(missing_ok=True)
        return removed


def _promoted_at(release: Path) -> float:
    try:
        return (release / MARKER).stat().st_mtime
    except OSError:
        return 0.0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
