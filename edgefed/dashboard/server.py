"""The dashboard's local web server: static files and the page's ``config.json``."""

from __future__ import annotations

import functools
import json
import logging
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

STATIC: Final = Path(__file__).resolve().parent / "static"


class _Handler(SimpleHTTPRequestHandler):
    """Files from ``static/``; ``/config.json`` from the command's settings."""

    def __init__(self, *args: Any, page_config: bytes, **kwargs: Any) -> None:
        self._page_config = page_config
        super().__init__(*args, directory=str(STATIC), **kwargs)

    def do_GET(self) -> None:
        """Serve the page's settings, else a static file."""
        if self.path.split("?")[0] != "/config.json":
            super().do_GET()
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self._page_config)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(self._page_config)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log, not to stderr."""
        log.debug("%s " + format, self.address_string(), *args)


class DashboardServer:
    """Serves the dashboard of ``federation``, whose page connects to ``ws_url``."""

    def __init__(
        self, federation: str, ws_url: str, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        """Listen on ``host:port`` (0: a free port; see :attr:`url`)."""
        page_config = json.dumps({"federation": federation, "ws_url": ws_url}).encode()
        handler = functools.partial(_Handler, page_config=page_config)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="edgefed-dashboard", daemon=True
        )

    @property
    def url(self) -> str:
        """Where the page is served."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def __enter__(self) -> DashboardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
