"""A local HTTP server that serves artifact files slowly, to hold a prepare open."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Slow(SimpleHTTPRequestHandler):
    delay = 0.0

    def do_GET(self) -> None:
        time.sleep(self.delay)  # the server's own pacing, in its own thread
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def slow_files(root: Path, delay: float) -> Iterator[str]:
    """Serve `root` on 127.0.0.1, each GET answered after `delay` seconds; yields its URL."""
    handler = type("SlowHandler", (_Slow,), {"delay": delay})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
