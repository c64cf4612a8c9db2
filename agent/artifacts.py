"""Fetching a release artifact into a staging dir: download, verify, unpack safely.

Called by the agent's prepare step (in a worker thread: everything here blocks).
An artifact is a `file://` directory (copied) or a `.tar.gz` reached by `file://` or
`http(s)://`. A download is bounded by `Limits`: an overall deadline (every socket it
opened is shut when it passes, so a server trickling bytes cannot hold a prepare),
and a size cap; redirects go to http(s) only and never from https to http. An
archive's sha256 is checked BEFORE anything is unpacked, and `agent.untar` refuses
any member that would land or point outside the destination, and caps the unpacked
size and member count. Every failure raises `ArtifactError` with a reason for the
NO vote.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from agent.untar import ArchiveRefused, unpack
from shared.config import AgentSettings
from shared.errors import PermanentError

CHUNK = 1 << 16


class ArtifactError(PermanentError):
    """The artifact could not be fetched, verified or unpacked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """How much one artifact may cost this host (from `AgentSettings`)."""

    max_bytes: int
    """Cap of the download and, separately, of the unpacked files."""
    max_members: int
    """Cap of the archive's members (files, dirs and links)."""
    download_timeout: float
    """Overall deadline of a download, connecting and redirects included."""

    @classmethod
    def of(cls, settings: AgentSettings) -> Limits:
        return cls(
            settings.artifact_max_bytes, settings.artifact_max_members, settings.download_timeout
        )


def fetch(
    url: str, sha256: str | None, dest: Path, scratch: Path, limits: Limits | None = None
) -> None:
    """Put the release at `url` into `dest` (which must not exist yet).

    `scratch` is a file path for the downloaded archive; it is removed afterwards.
    """
    limits = limits or Limits.of(AgentSettings())
    parsed = urlparse(url)
    if parsed.scheme == "file" and Path(unquote(parsed.path)).is_dir():
        _copy_tree(Path(unquote(parsed.path)), dest)
        return
    if sha256 is None:
        raise ArtifactError(f"{url} is not a directory, and an archive needs a sha256")
    try:
        digest = _download(url, scratch, limits)
        if digest != sha256:
            raise ArtifactError(f"sha256 mismatch: expected {sha256}, got {digest}")
        unpack(scratch, dest, limits.max_bytes, limits.max_members)
    except ArchiveRefused as e:
        raise ArtifactError(str(e)) from e
    finally:
        scratch.unlink(missing_ok=True)


def _copy_tree(source: Path, dest: Path) -> None:
    try:
        shutil.copytree(source, dest, symlinks=False)
    except (OSError, shutil.Error) as e:
        raise ArtifactError(f"copying {source} failed: {e}") from e


def _download(url: str, target: Path, limits: Limits) -> str:
    """Copy `url` to `target` within `limits`; the sha256 hex digest of what was written."""
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    deadline = _Deadline(limits.download_timeout)
    try:
        with deadline:
            with _open(url, deadline) as source, target.open("wb") as out:
                _check_length(source, limits.max_bytes)
                while chunk := source.read1(CHUNK):
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise ArtifactError(f"{url} is larger than {limits.max_bytes} bytes")
                    deadline.check()
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            deadline.check()  # a shut socket reads as the end of the body
    except ArtifactError:
        raise
    except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
        if deadline.expired:
            raise ArtifactError(deadline.reason) from e
        raise ArtifactError(f"downloading {url} failed: {e}") from e
    return digest.hexdigest()


def _check_length(source: io.BufferedIOBase, limit: int) -> None:
    length = getattr(source, "length", None)  # an HTTP response's Content-Length
    if isinstance(length, int) and length > limit:
        raise ArtifactError(f"the artifact is {length} bytes; the limit is {limit}")


def _open(url: str, deadline: _Deadline) -> io.BufferedIOBase:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).open("rb")
    if parsed.scheme in ("http", "https"):
        opener = urllib.request.build_opener(
            _HTTPHandler(deadline), _HTTPSHandler(deadline), NoDowngradeRedirects()
        )
        response: http.client.HTTPResponse = opener.open(url, timeout=deadline.left())
        return response
    raise ArtifactError(f"unsupported artifact URL {url!r}")


class _Deadline:
    """One download's overall deadline: when it passes, every socket the download
    opened is shut down, which wakes a read blocked on it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reason = f"the download took longer than its deadline of {seconds:g}s"
        self.expired = False
        self._at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()

    def left(self) -> float:
        return max(self._at - time.monotonic(), 0.001)

    def check(self) -> None:
        if self.expired or time.monotonic() >= self._at:
            raise ArtifactError(self.reason)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, even under TLS


class _HTTPConnection(http.client.HTTPConnection):
    """A connection whose socket is handed to the download's deadline."""

    def __init__(self, *args: Any, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        if self.deadline is not None:
            self.deadline.watch(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    """The TLS twin of `_HTTPConnection`."""

    def __init__(self, *args: Any, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        if self.deadline is not None:
            self.deadline.watch(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req, deadline=self.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        self.context = ssl.create_default_context()
        super().__init__(context=self.context)
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self.context, deadline=self.deadline)


def redirect_refusal(old_url: str, new_url: str) -> str | None:
    """Why a redirect from `old_url` to `new_url` must not be followed, or None."""
    old, new = urlparse(old_url).scheme.lower(), urlparse(new_url).scheme.lower()
    if new not in ("http", "https"):
        return f"refused a redirect from {old_url} to {new_url}: not an http(s) URL"
    if old == "https" and new != "https":
        return f"refused a redirect from {old_url} to {new_url}: https never falls back to http"
    return None


class NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only, and never from https to plain http."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        reason = redirect_refusal(req.full_url, newurl)
        if reason is not None:
            if fp is not None:
                fp.close()
            raise ArtifactError(reason)
        return super().redirect_request(req, fp, code, msg, headers, newurl)
