"""Fetching a release artifact into a staging dir: download, verify, unpack safely.

Called by the agent's prepare step (in a worker thread: everything here blocks).
An artifact is a `file://` directory (copied) or a `.tar.gz` reached by `file://` or
`http(s)://`. An archive's sha256 is checked BEFORE anything is unpacked, and no
member may land outside the destination (absolute paths, `..`, links pointing out,
devices). Every failure raises `ArtifactError` with a reason for the NO vote.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from shared.errors import PermanentError

CHUNK = 1 << 16
DOWNLOAD_TIMEOUT = 60.0


class ArtifactError(PermanentError):
    """The artifact could not be fetched, verified or unpacked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fetch(url: str, sha256: str | None, dest: Path, scratch: Path) -> None:
    """Put the release at `url` into `dest` (which must not exist yet).

    `scratch` is a file path for the downloaded archive; it is removed afterwards.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file" and Path(unquote(parsed.path)).is_dir():
        _copy_tree(Path(unquote(parsed.path)), dest)
        return
    try:
        digest = _download(url, scratch)
        if sha256 is not None and digest != sha256:
            raise ArtifactError(f"sha256 mismatch: expected {sha256}, got {digest}")
        unpack(scratch, dest)
    finally:
        scratch.unlink(missing_ok=True)


def _copy_tree(source: Path, dest: Path) -> None:
    try:
        shutil.copytree(source, dest, symlinks=False)
    except (OSError, shutil.Error) as e:
        raise ArtifactError(f"copying {source} failed: {e}") from e


def _open(url: str) -> BinaryIO:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).open("rb")
    if parsed.scheme in ("http", "https"):
        response: BinaryIO = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
        return response
    raise ArtifactError(f"unsupported artifact URL {url!r}")


def _download(url: str, target: Path) -> str:
    """Copy `url` to `target`; the sha256 hex digest of what was written."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _open(url) as source, target.open("wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except ArtifactError:
        raise
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise ArtifactError(f"downloading {url} failed: {e}") from e
    return digest.hexdigest()


def unpack(archive: Path, dest: Path) -> None:
    """Unpack the .tar.gz `archive` into `dest`, refusing any member that escapes it."""
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member, dest)
            tar.extractall(dest, members=members, filter="data")
    except ArtifactError:
        raise
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArtifactError(f"unpacking {archive.name} failed: {e}") from e


def _inside(path: str, root: Path) -> bool:
    resolved = os.path.normpath(os.path.join(root, path))
    return resolved == str(root) or resolved.startswith(str(root) + os.sep)


def check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Raise `ArtifactError` if `member` would land (or point) outside `dest`."""
    root = dest.resolve()
    name = member.name
    if os.path.isabs(name) or ".." in Path(name).parts or not _inside(name, root):
        raise ArtifactError(f"unsafe path in archive: {name!r} escapes the release dir")
    if member.issym():
        target = os.path.join(os.path.dirname(name), member.linkname)
        if os.path.isabs(member.linkname) or not _inside(target, root):
            raise ArtifactError(f"unsafe symlink in archive: {name!r} -> {member.linkname!r}")
    elif member.islnk():
        if os.path.isabs(member.linkname) or not _inside(member.linkname, root):
            raise ArtifactError(f"unsafe hard link in archive: {name!r} -> {member.linkname!r}")
    elif not (member.isfile() or member.isdir()):
        raise ArtifactError(f"unsupported member type in archive: {name!r}")
