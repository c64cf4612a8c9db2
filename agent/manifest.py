"""Manifests of release dirs: what a promoted release held, to tell an intact one.

`agent.releases` records a manifest when it promotes a release (staging ->
releases/<version>) and checks it in `is_intact`, which is what lets a rollback
reuse a kept release dir without fetching anything (SPEC 6.3). A manifest maps the
relative path of every regular file to its sha256 and of every symlink to its target.
Checking is strict about what was recorded (a changed, missing or retyped file fails)
and ignores files added later: a running service and its hooks write into their cwd
(`__pycache__`, markers, local data), and that must not cost a rollback its fast path.
Pure filesystem work, blocking: callers on the event loop use a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1
CHUNK = 1 << 16


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str] = field(default_factory=dict)
    """Relative path -> sha256 hex digest of every regular file."""
    links: dict[str, str] = field(default_factory=dict)
    """Relative path -> target of every symlink."""

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "files": self.files, "links": self.links})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """The manifest in `text`; ValueError if it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a release manifest")
        files, links = data.get("files"), data.get("links")
        if not isinstance(files, dict) or not isinstance(links, dict):
            raise ValueError("not a release manifest")
        return cls({str(k): str(v) for k, v in files.items()},
                   {str(k): str(v) for k, v in links.items()})  # fmt: skip


def build(root: Path, skip: frozenset[str] = frozenset()) -> Manifest:
    """The manifest of the tree at `root` (top-level names in `skip` left out)."""
    manifest = Manifest()
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if rel in skip:
                continue
            if path.is_symlink():
                manifest.links[rel] = os.readlink(path)
            elif path.is_file():
                manifest.files[rel] = _sha256(path)
    return manifest


def problems(root: Path, manifest: Manifest) -> list[str]:
    """How the tree at `root` differs from `manifest` (empty: it is intact)."""
    found = []
    for rel, target in manifest.links.items():
        path = root / rel
        if not path.is_symlink() or os.readlink(path) != target:
            found.append(f"{rel}: symlink changed")
    for rel, digest in manifest.files.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            found.append(f"{rel}: missing")
        elif _sha256(path) != digest:
            found.append(f"{rel}: content changed")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
