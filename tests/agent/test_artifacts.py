"""Fetching artifacts: digest checked before unpacking, no path may escape."""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.artifacts import ArtifactError, fetch
from tests.support.artifacts import build_artifact


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archive_is_verified_and_unpacked(tmp_path: Path) -> None:
    path, digest = build_artifact(tmp_path / "a", "demo", "1.0.0")
    dest = tmp_path / "dest"
    fetch(path.as_uri(), digest, dest, tmp_path / "dl.tar.gz")
    assert (dest / "VERSION").read_text() == "1.0.0\n"
    assert (dest / "server.py").is_file()
    assert not (tmp_path / "dl.tar.gz").exists()


def test_sha_mismatch_refused_before_unpacking(tmp_path: Path) -> None:
    path, _ = build_artifact(tmp_path / "a", "demo", "1.0.0")
    dest = tmp_path / "dest"
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        fetch(path.as_uri(), "0" * 64, dest, tmp_path / "dl.tar.gz")
    assert not dest.exists()
    assert not (tmp_path / "dl.tar.gz").exists()


def test_missing_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="downloading"):
        fetch((tmp_path / "nope.tar.gz").as_uri(), "0" * 64, tmp_path / "d", tmp_path / "dl")


def _evil(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (tarfile.TarInfo("../escape.txt"), "escapes"),
        (tarfile.TarInfo("a/../../escape.txt"), "escapes"),
        (tarfile.TarInfo("/etc/evil"), "escapes"),
        (_link("link", "/etc/passwd", tarfile.SYMTYPE), "symlink"),
        (_link("sub/link", "../../outside", tarfile.SYMTYPE), "symlink"),
        (_link("hard", "../outside", tarfile.LNKTYPE), "hard link"),
        (_link("fifo", "", tarfile.FIFOTYPE), "unsupported"),
    ],
)
def test_escaping_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    archive = _evil(tmp_path, member)
    dest = tmp_path / "dest"
    with pytest.raises(ArtifactError, match=reason):
        fetch(archive.as_uri(), _sha(archive), dest, tmp_path / "dl.tar.gz")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "outside").exists()


def test_symlink_inside_the_release_is_fine(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("bin/app")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
        tar.addfile(_link("app", "bin/app", tarfile.SYMTYPE))
    dest = tmp_path / "dest"
    fetch(archive.as_uri(), _sha(archive), dest, tmp_path / "dl.tar.gz")
    assert (dest / "app").read_text() == "hi"


def test_directory_artifact_is_copied(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f.txt").write_text("content")
    dest = tmp_path / "dest"
    fetch(source.as_uri(), None, dest, tmp_path / "dl")
    assert (dest / "sub" / "f.txt").read_text() == "content"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_download_is_verified(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    path, digest = build_artifact(root, "demo", "2.0.0")
    dest = tmp_path / "dest"
    fetch(f"{base}/{path.name}", digest, dest, tmp_path / "dl.tar.gz")
    assert (dest / "VERSION").read_text() == "2.0.0\n"
    with pytest.raises(ArtifactError, match="404"):
        fetch(f"{base}/missing.tar.gz", digest, tmp_path / "d2", tmp_path / "dl2.tar.gz")
