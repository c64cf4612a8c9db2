"""A tiny stdlib-only HTTP service: the demo's services and every agent test run it.

Started by an agent (`run = "python server.py"` in its release dir), or by hand.
GET /health answers 200 "ok" (500 when unhealthy) and GET /version answers the
version. Settings come from the environment, with defaults from a `service.env` file
(KEY=VALUE lines) in the working directory, which `build_artifact` bakes into test
releases:

- PORT: the port to listen on (127.0.0.1), required;
- VERSION: the version to report; falls back to a file named VERSION in the cwd;
- FAIL_HEALTH=1: /health always answers 500;
- FAIL_HEALTH_AFTER=<seconds>: healthy for that long after start, then 500.

SIGTERM (and SIGINT) stop it cleanly with exit status 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

STARTED = time.monotonic()


def settings() -> dict[str, str]:
    """service.env defaults overridden by the environment."""
    values: dict[str, str] = {}
    env_file = Path("service.env")
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                values[key.strip()] = value.strip()
    values.update(os.environ)
    return values


def version(config: dict[str, str]) -> str:
    if config.get("VERSION"):
        return config["VERSION"]
    path = Path("VERSION")
    return path.read_text().strip() if path.is_file() else "unknown"


def healthy(config: dict[str, str]) -> bool:
    if config.get("FAIL_HEALTH") == "1":
        return False
    after = config.get("FAIL_HEALTH_AFTER")
    return not (after and time.monotonic() - STARTED > float(after))


class Handler(BaseHTTPRequestHandler):
    config: dict[str, str] = {}

    def do_GET(self) -> None:
        if self.path == "/health":
            ok = healthy(self.config)
            self._answer(200 if ok else 500, "ok" if ok else "unhealthy")
        elif self.path == "/version":
            self._answer(200, version(self.config))
        else:
            self._answer(404, "not found")

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # health probes every 100 ms would flood the log


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    config = settings()
    Handler.config = config
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", int(config["PORT"])), Handler)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"serving version {version(config)} on port {config['PORT']}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        print("stopped", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
