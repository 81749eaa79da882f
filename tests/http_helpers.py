"""Test helper: a local HTTP server in a background thread (stream URLs without the network)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging every request to stderr."""

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serving(handler) -> Iterator[str]:
    """Serve ``handler`` (a request handler class) on a free local port: yields the base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def serving_folder(folder: Path):
    """:func:`serving` the files of ``folder``."""
    return serving(functools.partial(QuietHandler, directory=str(folder)))
