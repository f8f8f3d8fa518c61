"""Serve a generated site on 127.0.0.1 from a background thread.

Only HTML pages are served (the ground-truth `site.json` is not); `GET /search?q=...` answers the index
page's search form with the BM25 results of `cso_lib.web.search` rendered as HTML.

>>> import tempfile, urllib.request
>>> from cso_lib.web.site import generate_site
>>> folder = tempfile.mkdtemp(); _ = generate_site(folder, seed=1)
>>> with SiteServer(folder) as srv:
...     urllib.request.urlopen(srv.url + "index.html").status
200
"""

from __future__ import annotations

import html
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cso_lib.web.search import SearchIndex


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/search":
            self._search(parse_qs(parts.query).get("q", [""])[0])
            return
        if not (parts.path.endswith(".html") or parts.path.endswith("/")):
            self.send_error(404, "only HTML pages are served")
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        self.do_GET()

    def list_directory(self, path: str | Path) -> None:
        self.send_error(404, "no directory listings")
        return None

    def _search(self, query: str) -> None:
        hits = self.server.index.search(query, 10) if query.strip() else []
        items = "".join(
            f'<li><a href="{html.escape(h.url)}">{html.escape(h.title)}</a><p>{html.escape(h.snippet)}</p></li>'
            for h in hits
        )
        body = (
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Search: "
            f"{html.escape(query)}</title></head><body><nav><a href=\"/index.html\">Main page</a></nav>"
            f"<h1>Search results for {html.escape(query)!s}</h1>"
            + (f"<ol>{items}</ol>" if items else "<p>No results.</p>") + "</body></html>\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    index: SearchIndex


class SiteServer:
    """`with SiteServer(folder) as srv:` serves `folder` at `srv.url` (http://127.0.0.1:PORT/)."""

    def __init__(self, folder: str | Path, port: int = 0) -> None:
        self.folder = str(folder)
        self.port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use `with SiteServer(folder) as srv:`")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def start(self) -> SiteServer:
        folder = self.folder

        class Handler(_Handler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=folder, **kwargs)

        self._httpd = _Server(("127.0.0.1", self.port), Handler)
        self._httpd.index = SearchIndex.from_folder(folder, base_url=self.url)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="cso-site-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SiteServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
