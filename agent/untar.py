"""Unpacking an untrusted .tar.gz into a fresh directory, member by member.

Called by `agent.artifacts.fetch` (in a worker thread) once the archive's sha256 has
matched. Python 3.11's `tarfile` filters are not trusted (symlink chains deeper than
PATH_MAX fooled them: CVE-2025-4517), so nothing here asks the filesystem where a
path leads. `_Tree` remembers every entry this archive created, links included, and
resolves each member's path in memory, the way the kernel would, refusing any that
climbs above the destination; the entry is then created by walking real directories
with `O_NOFOLLOW` from a descriptor of the destination, so no symlink is followed on
the way even if the model were wrong. Absolute names, `..` in names, devices, fifos,
sparse files, duplicates and hard links to anything but an earlier regular file are
refused; so are archives past `max_members` members or `max_bytes` unpacked bytes.
Every refusal raises `ArchiveRefused` with the reason.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import zlib
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import PermanentError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

CHUNK = 1 << 16
MAX_HOPS = 40
"""Symlinks followed while resolving one path (the kernel's own limit, MAXSYMLINKS)."""
HEADER_ALLOWANCE = 4096
"""Bytes of tar headers allowed per member on top of `max_bytes` of content."""

Parts = tuple[str, ...]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveRefused(PermanentError):
    """The archive is unsafe, too big, or not a readable .tar.gz."""


def unpack(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    """Unpack the .tar.gz `archive` into `dest` (created here); on refusal, remove it."""
    dest.mkdir(parents=True)
    try:
        root_fd = os.open(dest, _DIR_FLAGS)
        limit = max_bytes + HEADER_ALLOWANCE * max_members
        try:
            with (
                gzip.open(archive, "rb") as raw,
                _Capped(raw, limit) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                _Tree(root_fd, tar).unpack(tar, max_bytes, max_members)
        finally:
            os.close(root_fd)
    except ArchiveRefused:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, zlib.error) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveRefused(f"unpacking the archive failed: {e}") from e


class _Capped(io.RawIOBase):
    """The decompressed stream, refused once it runs past `limit` bytes (gzip bombs,
    giant headers): tarfile never holds more than that in memory."""

    def __init__(self, source: io.BufferedIOBase, limit: int) -> None:
        self.source, self.limit, self.seen = source, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.source.read(len(view))
        self.seen += len(data)
        if self.seen > self.limit:
            raise ArchiveRefused(f"archive unpacks to more than {self.limit} bytes")
        view[: len(data)] = data
        return len(data)


class _Tree:
    """What this archive has created under the destination: paths are tuples of real
    (link-free) components below it, so resolving one never touches the disk."""

    def __init__(self, root_fd: int, tar: tarfile.TarFile) -> None:
        self.root_fd = root_fd
        self.tar = tar
        self.kinds: dict[Parts, str] = {(): "dir"}
        self.links: dict[Parts, str] = {}

    def unpack(self, members: Iterable[tarfile.TarInfo], max_bytes: int, max_members: int) -> None:
        total = 0
        for count, member in enumerate(members, start=1):
            if count > max_members:
                raise ArchiveRefused(f"archive has more than {max_members} members")
            if member.isreg():
                total += member.size
                if total > max_bytes:
                    raise ArchiveRefused(f"archive unpacks to more than {max_bytes} bytes")
            self.add(member)
        for path, target in self.links.items():  # a later member may have redirected a link
            what = f"symlink in archive {'/'.join(path)!r} -> {target!r}"
            self.resolve([*path[:-1], *target.split("/")], what)

    def resolve(self, parts: Iterable[str], what: str, follow_last: bool = True) -> Parts:
        """Where `parts` (relative to the destination) leads, following known links."""
        todo, hops = deque(parts), 0
        done: list[str] = []
        while todo:
            part = todo.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise ArchiveRefused(f"unsafe {what}: escapes the release dir")
                done.pop()
                continue
            target = self.links.get((*done, part))
            if target is None or not (todo or follow_last):
                done.append(part)
                continue
            hops += 1
            if hops > MAX_HOPS:
                raise ArchiveRefused(f"unsafe {what}: more than {MAX_HOPS} symlinks deep")
            todo.extendleft(reversed(target.split("/")))
        return tuple(done)

    def add(self, member: tarfile.TarInfo) -> None:
        what = f"path in archive {member.name!r}"
        path = self._place(member.name, what)
        if member.isdir():
            self._directory(path, member, what)
        elif path in self.kinds:
            raise ArchiveRefused(f"unsafe {what}: it would replace an earlier member")
        elif member.isreg() and not member.issparse():
            self._file(path, member)
        elif member.issym():
            self._symlink(path, member)
        elif member.islnk():
            self._hardlink(path, member)
        else:
            raise ArchiveRefused(f"unsupported member type in archive: {member.name!r}")

    def _place(self, name: str, what: str) -> Parts:
        """The real path of the entry `name` names (its own last component not followed)."""
        parts = name.split("/")
        if name.startswith("/") or ".." in parts:
            raise ArchiveRefused(f"unsafe {what}: escapes the release dir")
        return self.resolve(parts, what, follow_last=False)

    def _directory(self, path: Parts, member: tarfile.TarInfo, what: str) -> None:
        kind = self.kinds.get(path)
        if kind is not None and kind != "dir":
            raise ArchiveRefused(f"unsafe {what}: it would replace an earlier member")
        if kind is None:
            with _Parent(self, path) as parent:
                os.mkdir(path[-1], (member.mode & 0o755) | 0o700, dir_fd=parent)
            self.kinds[path] = "dir"

    def _file(self, path: Parts, member: tarfile.TarInfo) -> None:
        source = self.tar.extractfile(member)
        assert source is not None  # a regular member always has data
        with _Parent(self, path) as parent:
            fd = os.open(path[-1], _NEW_FILE, (member.mode & 0o755) | 0o600, dir_fd=parent)
        self.kinds[path] = "file"
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            os.utime(out.fileno(), (member.mtime, member.mtime))

    def _symlink(self, path: Parts, member: tarfile.TarInfo) -> None:
        target = member.linkname
        what = f"symlink in archive {member.name!r} -> {target!r}"
        if target.startswith("/") or not target:
            raise ArchiveRefused(f"unsafe {what}: escapes the release dir")
        self.resolve([*path[:-1], *target.split("/")], what)
        with _Parent(self, path) as parent:
            os.symlink(target, path[-1], dir_fd=parent)
        self.kinds[path] = "link"
        self.links[path] = target

    def _hardlink(self, path: Parts, member: tarfile.TarInfo) -> None:
        what = f"hard link in archive {member.name!r} -> {member.linkname!r}"
        source = self._place(member.linkname, what)
        if self.kinds.get(source) != "file":
            raise ArchiveRefused(f"unsafe {what}: not an earlier file of the archive")
        with _Parent(self, source) as src, _Parent(self, path) as dst:
            os.link(source[-1], path[-1], src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
        self.kinds[path] = "file"


class _Parent:
    """A descriptor of the directory holding `path`, reached from the destination with
    `O_NOFOLLOW` at every step; missing directories are created on the way."""

    def __init__(self, tree: _Tree, path: Parts) -> None:
        self.tree, self.path, self.fd = tree, path, -1

    def __enter__(self) -> int:
        self.fd = os.dup(self.tree.root_fd)
        for depth, part in enumerate(self.path[:-1], start=1):
            here = self.path[:depth]
            kind = self.tree.kinds.get(here)
            if kind is None:
                os.mkdir(part, 0o755, dir_fd=self.fd)
                self.tree.kinds[here] = kind = "dir"
            if kind != "dir":
                raise ArchiveRefused(f"unsafe path in archive: {'/'.join(here)} is not a dir")
            fd = os.open(part, _DIR_FLAGS, dir_fd=self.fd)
            os.close(self.fd)
            self.fd = fd
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
