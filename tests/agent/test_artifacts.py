"""Fetching artifacts: digest checked before unpacking, no path may escape, and every
hostile archive is refused with nothing written outside the staging dir."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import io
import ipaddress
import os
import re
import ssl
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.artifacts import ArtifactError, Limits, NoDowngradeRedirects, fetch, redirect_refusal
from shared.messages import Prepare, Vote
from tests.agent.conftest import Coordinator, Fleet
from tests.agent.helpers import demo_version
from tests.support.artifacts import build_artifact, escaping_symlink_chain, member, pack

LIMITS = Limits(max_bytes=1 << 20, max_members=1000, download_timeout=10.0)


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


def test_an_archive_without_a_sha256_is_refused_by_the_agent_too(tmp_path: Path) -> None:
    path, _ = build_artifact(tmp_path / "a", "demo", "1.0.0")
    with pytest.raises(ArtifactError, match="needs a sha256"):
        fetch(path.as_uri(), None, tmp_path / "dest", tmp_path / "dl.tar.gz")
    assert not (tmp_path / "dest").exists()


def test_missing_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="downloading"):
        fetch((tmp_path / "nope.tar.gz").as_uri(), "0" * 64, tmp_path / "d", tmp_path / "dl")


# --- hostile archives ---------------------------------------------------------------


def _everything(root: Path) -> set[str]:
    """Every path under `root` (links not followed), relative to it."""
    found = set()
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(here, name), root))
    return found


def _refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], limits: Limits = LIMITS
) -> str:
    """Fetch `members` as an archive into box/staging/d1: the refusal's reason.

    Asserts that the whole box holds nothing but the (empty) staging dir afterwards.
    """
    archive = tmp_path / "evil.tar.gz"
    digest = pack(archive, members)
    box = tmp_path / "box"
    (box / "staging").mkdir(parents=True)
    with pytest.raises(ArtifactError) as info:
        fetch(archive.as_uri(), digest, box / "staging" / "d1", tmp_path / "dl.tar.gz", limits)
    assert _everything(box) == {"staging"}, "something was left behind or written outside"
    assert sorted(os.listdir(tmp_path)) == ["box", "evil.tar.gz"]
    return info.value.reason


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        pytest.param([member("../escape.txt")], "escapes", id="dot-dot"),
        pytest.param([member("a/../../escape.txt")], "escapes", id="nested-dot-dot"),
        pytest.param([member("/tmp/escape-abs.txt")], "escapes", id="absolute"),
        pytest.param([member("link", tarfile.SYMTYPE, "/etc")], "symlink", id="absolute-symlink"),
        pytest.param(
            [member("sub", tarfile.DIRTYPE), member("sub/link", tarfile.SYMTYPE, "../../out")],
            "symlink",
            id="relative-symlink-out",
        ),
        pytest.param(
            [member("link", tarfile.SYMTYPE, ".."), member("link/escape.txt")],
            "symlink",
            id="symlink-to-parent-then-write-through",
        ),
        pytest.param(
            [member("hard", tarfile.LNKTYPE, "../outside")], "hard link", id="hardlink-out"
        ),
        pytest.param(
            [member("hard", tarfile.LNKTYPE, "later"), member("later", data=b"x")],
            "hard link",
            id="hardlink-to-a-later-member",
        ),
        pytest.param(
            [member("hard", tarfile.LNKTYPE, "/etc/passwd")], "hard link", id="hardlink-absolute"
        ),
        pytest.param([member("fifo", tarfile.FIFOTYPE)], "unsupported", id="fifo"),
        pytest.param([member("tty", tarfile.CHRTYPE)], "unsupported", id="char-device"),
        pytest.param([member("disk", tarfile.BLKTYPE)], "unsupported", id="block-device"),
        pytest.param(
            [member("f", data=b"1"), member("f", tarfile.SYMTYPE, "g")],
            "replace an earlier member",
            id="duplicate-turns-a-file-into-a-link",
        ),
    ],
)
def test_escaping_members_are_refused_and_nothing_is_written(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], reason: str
) -> None:
    assert reason in _refused(tmp_path, [member("ok.txt", data=b"fine"), *members])


def test_a_symlink_chain_deeper_than_path_max_that_escapes_is_refused(tmp_path: Path) -> None:
    chain = escaping_symlink_chain(steps=16, width=247)  # real path ~4000 chars deep
    reason = _refused(tmp_path, chain)
    assert "symlink in archive 'escape'" in reason
    assert "escapes the release dir" in reason
    assert not (tmp_path / "box" / "escaped").exists()


def test_a_short_multi_hop_chain_whose_every_hop_looks_inside_is_refused(tmp_path: Path) -> None:
    reason = _refused(tmp_path, escaping_symlink_chain(steps=4, width=8))
    assert "escapes the release dir" in reason


def test_a_link_redirected_by_a_later_member_to_point_outside_is_refused(tmp_path: Path) -> None:
    # "s" -> "x/../y" is inside while x does not exist; once x -> "." it leaves the dir.
    members = [member("s", tarfile.SYMTYPE, "x/../y"), member("x", tarfile.SYMTYPE, ".")]
    assert "escapes the release dir" in _refused(tmp_path, members)


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    members = [member("a", tarfile.SYMTYPE, "b"), member("b", tarfile.SYMTYPE, "a")]
    assert "symlinks deep" in _refused(tmp_path, members)


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    members = [member(f"f{i}", data=b"x") for i in range(11)]
    limits = Limits(max_bytes=1 << 20, max_members=10, download_timeout=10.0)
    assert _refused(tmp_path, members, limits) == "archive has more than 10 members"


def test_an_archive_that_unpacks_past_the_size_cap_is_refused(tmp_path: Path) -> None:
    members = [member("a", data=b"\0" * 600), member("b", data=b"\0" * 600)]
    limits = Limits(max_bytes=1000, max_members=10, download_timeout=10.0)
    assert _refused(tmp_path, members, limits) == "archive unpacks to more than 1000 bytes"


def test_giant_headers_count_against_the_unpacked_size(tmp_path: Path) -> None:
    info, _ = member("small")
    info.pax_headers = {"comment": "x" * 200_000}  # held in memory by tarfile: bounded too
    limits = Limits(max_bytes=1000, max_members=10, download_timeout=10.0)
    assert "unpacks to more than" in _refused(tmp_path, [(info, b"")], limits)


def test_not_a_gzip_is_an_artifact_error(tmp_path: Path) -> None:
    archive = tmp_path / "junk.tar.gz"
    archive.write_bytes(b"this is not gzip")
    with pytest.raises(ArtifactError, match="unpacking the archive failed: Not a gzipped file"):
        fetch(archive.as_uri(), _sha(archive), tmp_path / "dest", tmp_path / "dl", LIMITS)
    assert not (tmp_path / "dest").exists()


def test_links_dirs_and_hard_links_inside_the_release_are_fine(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    digest = pack(
        archive,
        [
            member(".", tarfile.DIRTYPE),
            member("bin/app", data=b"hi"),  # its dir is implied
            member("app", tarfile.SYMTYPE, "bin/app"),
            member("lib", tarfile.SYMTYPE, "bin"),
            member("lib/extra", data=b"through a link"),
            member("bin/same", tarfile.LNKTYPE, "bin/app"),
            member("bin", tarfile.DIRTYPE),  # a dir entry after its files
            member("up", tarfile.SYMTYPE, "bin/../app"),
        ],
    )
    dest = tmp_path / "dest"
    fetch(archive.as_uri(), digest, dest, tmp_path / "dl.tar.gz", LIMITS)
    assert (dest / "app").read_text() == "hi"
    assert (dest / "bin" / "extra").read_text() == "through a link"
    assert (dest / "bin" / "same").stat().st_ino == (dest / "bin" / "app").stat().st_ino
    assert (dest / "up").read_text() == "hi"
    assert os.readlink(dest / "lib") == "bin"


def test_file_modes_keep_exec_bits_and_lose_setuid_and_group_write(tmp_path: Path) -> None:
    info, data = member("run.sh", data=b"#!/bin/sh\n")
    info.mode = 0o4777
    archive = tmp_path / "modes.tar.gz"
    digest = pack(archive, [(info, data)])
    dest = tmp_path / "dest"
    fetch(archive.as_uri(), digest, dest, tmp_path / "dl.tar.gz", LIMITS)
    mode = (dest / "run.sh").stat().st_mode & 0o7777
    assert mode & 0o100
    assert not mode & 0o7022


def test_symlink_inside_the_release_is_fine(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("bin/app")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("app")
        link.type, link.linkname = tarfile.SYMTYPE, "bin/app"
        tar.addfile(link)
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


# --- downloads ----------------------------------------------------------------------

Route = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    """Answers each path with the route of that name (see `_routes`)."""

    routes: dict[str, Route]
    stop: threading.Event

    def do_GET(self) -> None:
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            route(self)  # a refusing client hangs up mid-answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def _trickle_body(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(1 << 20))
    h.end_headers()
    while not h.stop.wait(0.02):  # one byte every 20ms: every read returns, none is last
        h.wfile.write(b"x")
        h.wfile.flush()


def _trickle_headers(h: _Handler) -> None:
    for byte in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"a" * 10_000:
        h.wfile.write(bytes([byte]))
        h.wfile.flush()
        if h.stop.wait(0.02):
            return


def _big(size: int, sized: bool) -> Route:
    def route(h: _Handler) -> None:
        h.send_response(200)
        if sized:
            h.send_header("Content-Length", str(size))
        h.end_headers()
        h.wfile.write(b"\0" * size)  # unsized: HTTP/1.0, the body ends when we close

    return route


def _redirect(location: str) -> Route:
    def route(h: _Handler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def _file(path: Path) -> Route:
    def route(h: _Handler) -> None:
        data = path.read_bytes()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


@contextmanager
def _serve(routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """An HTTP(S) server on 127.0.0.1 answering `routes`; yields its base URL."""
    stop = threading.Event()
    handler = type("Handler", (_Handler,), {"routes": routes, "stop": stop})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_download_is_verified(tmp_path: Path) -> None:
    path, digest = build_artifact(tmp_path / "www", "demo", "2.0.0")
    with _serve({"/a.tar.gz": _file(path)}) as base:
        fetch(f"{base}/a.tar.gz", digest, tmp_path / "dest", tmp_path / "dl.tar.gz", LIMITS)
        assert (tmp_path / "dest" / "VERSION").read_text() == "2.0.0\n"
    with _serve({}) as base, pytest.raises(ArtifactError, match="404"):
        fetch(f"{base}/missing.tar.gz", digest, tmp_path / "d2", tmp_path / "dl2.tar.gz")


@pytest.mark.parametrize("route", [_trickle_body, _trickle_headers], ids=["body", "headers"])
def test_a_server_that_trickles_bytes_is_cut_off_at_the_overall_deadline(
    tmp_path: Path, route: Route
) -> None:
    limits = Limits(max_bytes=1 << 20, max_members=10, download_timeout=1.0)
    started = time.monotonic()
    with _serve({"/a.tar.gz": route}) as base, pytest.raises(ArtifactError) as info:
        fetch(f"{base}/a.tar.gz", "0" * 64, tmp_path / "dest", tmp_path / "dl", limits)
    assert "deadline of 1s" in info.value.reason
    assert time.monotonic() - started < 4  # each read was quick; only the deadline stops it
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize(
    ("sized", "reason"),
    [(True, "the artifact is 5000 bytes; the limit is 4096"), (False, "larger than 4096 bytes")],
    ids=["content-length", "no-content-length"],
)
def test_a_download_past_the_size_cap_is_refused(tmp_path: Path, sized: bool, reason: str) -> None:
    limits = Limits(max_bytes=4096, max_members=10, download_timeout=10.0)
    with _serve({"/a.tar.gz": _big(5000, sized)}) as base, pytest.raises(ArtifactError) as info:
        fetch(f"{base}/a.tar.gz", "0" * 64, tmp_path / "dest", tmp_path / "dl", limits)
    assert reason in info.value.reason
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize(
    ("old", "new", "refused"),
    [
        ("https://a/x.tgz", "http://a/x.tgz", "https never falls back to http"),
        ("https://a/x.tgz", "HTTP://a/x.tgz", "https never falls back to http"),
        ("http://a/x.tgz", "ftp://a/x.tgz", "not an http(s) URL"),
        ("http://a/x.tgz", "file:///etc/passwd", "not an http(s) URL"),
        ("https://a/x.tgz", "https://b/x.tgz", None),
        ("http://a/x.tgz", "https://b/x.tgz", None),
        ("http://a/x.tgz", "http://b/x.tgz", None),
    ],
)
def test_redirects_go_to_http_only_and_never_from_https_to_http(
    old: str, new: str, refused: str | None
) -> None:
    reason = redirect_refusal(old, new)
    assert (reason is None) if refused is None else (refused in str(reason))
    request = urllib.request.Request(old)
    headers = http.client.HTTPMessage()
    if refused is None:
        assert NoDowngradeRedirects().redirect_request(request, None, 302, "", headers, new)
    else:
        with pytest.raises(ArtifactError, match=re.escape(refused)):
            NoDowngradeRedirects().redirect_request(request, None, 302, "", headers, new)


def test_a_redirect_between_http_urls_is_followed_and_one_to_ftp_is_not(tmp_path: Path) -> None:
    path, digest = build_artifact(tmp_path / "www", "demo", "2.0.0")
    routes = {"/a.tar.gz": _file(path), "/ftp": _redirect("ftp://127.0.0.1/a.tar.gz")}
    with _serve(routes) as base:
        routes["/moved"] = _redirect(f"{base}/a.tar.gz")
        fetch(f"{base}/moved", digest, tmp_path / "dest", tmp_path / "dl", LIMITS)
        assert (tmp_path / "dest" / "VERSION").read_text() == "2.0.0\n"
        with pytest.raises(ArtifactError, match="not an http"):
            fetch(f"{base}/ftp", digest, tmp_path / "d2", tmp_path / "dl", LIMITS)


def _self_signed(directory: Path) -> Path:
    """A certificate for 127.0.0.1 and its key in one PEM file, trusted by nothing else."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / "server.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_an_https_artifact_redirected_to_plain_http_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pem = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))  # the agent's default context trusts it
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pem)
    path, digest = build_artifact(tmp_path / "www", "demo", "2.0.0")
    with _serve({"/a.tar.gz": _file(path)}) as plain:
        routes = {"/a.tar.gz": _file(path), "/down": _redirect(f"{plain}/a.tar.gz")}
        with _serve(routes, tls) as secure:
            fetch(f"{secure}/a.tar.gz", digest, tmp_path / "dest", tmp_path / "dl", LIMITS)
            assert (tmp_path / "dest" / "VERSION").read_text() == "2.0.0\n"  # TLS works
            with pytest.raises(ArtifactError, match="https never falls back to http"):
                fetch(f"{secure}/down", digest, tmp_path / "d2", tmp_path / "dl", LIMITS)
    assert not (tmp_path / "d2").exists()


# --- through the agent --------------------------------------------------------------


async def test_a_prepare_of_a_hostile_archive_votes_no_naming_it_and_leaves_nothing(
    coordinator: Coordinator, fleet: Fleet, tmp_path: Path
) -> None:
    agent = await fleet.start_agent()
    archive = tmp_path / "artifacts" / "evil-6.6.6.tar.gz"
    digest = pack(archive, escaping_symlink_chain(payload="escaped/pwned"))
    spec = demo_version(tmp_path / "artifacts", "6.6.6").model_copy(
        update={"artifact": archive.as_uri(), "sha256": digest}
    )
    await coordinator.send(Prepare(deployment_id="d1", spec=spec, from_version=None))
    vote = await coordinator.wait(Vote, deployment_id="d1")
    assert not vote.yes
    assert "symlink in archive 'escape'" in vote.reason
    assert "escapes the release dir" in vote.reason
    service_dir = agent.releases.service_dir("demo")
    left = _everything(service_dir) if service_dir.exists() else set()
    assert not {p for p in left if "escaped" in p or p.startswith("releases/")}, left
    assert left <= {"staging"}, left
    assert not any("escaped" in p for p in _everything(tmp_path))
    txn = await agent.store.txn("d1", "demo")
    assert txn is not None
    assert txn.state == "no"
