"""A real HTTP server on 127.0.0.1 (``http.server`` in a thread) for the download tests.

It serves byte strings by path, honours ``Range: bytes=N-`` with 206 answers, and can misbehave on
purpose: cut a transfer short (the ``Content-Length`` of the whole answer, then fewer bytes and a closed
connection), ignore ``Range``, answer with an HTML page, or play Google Drive's confirmation flow
(``/uc?export=download&id=ID`` answers a "can't scan this file" page whose form, ``confirm=`` link or
``download_warning`` cookie leads to the file). Every request is logged (path, query, ``Range`` header).
"""

from __future__ import annotations

import http.server
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Served:
    """What the server answers for one path."""

    body: bytes
    content_type: str = "application/octet-stream"
    truncate_first: int = 0  # this many answers send only half of what they announce
    truncate_to: int | None = None  # ... or only this many bytes (default: half)
    ignore_range: bool = False
    delay_s: float = 0.0


@dataclass
class LoopbackServer:
    files: dict[str, Served] = field(default_factory=dict)
    drive: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (confirmation kind, body)
    requests: list[tuple[str, dict[str, list[str]], str | None]] = field(default_factory=list)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def requests_for(self, path: str) -> list[tuple[str, dict[str, list[str]], str | None]]:
        return [request for request in self.requests if request[0] == path]


def _handler(server: LoopbackServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            parts = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parts.query)
            server.requests.append((parts.path, query, self.headers.get("Range")))
            if parts.path == "/uc" and query.get("id", [""])[0] in server.drive:
                return self._drive(query)
            if parts.path == "/download" and query.get("id", [""])[0] in server.drive:
                kind, body = server.drive[query["id"][0]]
                if query.get("confirm") == ["t"] and query.get("uuid") == ["u-1"]:
                    return self._send(Served(body))
                return self._error(403)
            served = server.files.get(parts.path)
            if served is None:
                return self._error(404)
            self._send(served)

        def _drive(self, query: dict[str, list[str]]) -> None:
            file_id = query["id"][0]
            kind, body = server.drive[file_id]
            if query.get("confirm") == ["tok-42"] and "download_warning_1=tok-42" in self.headers.get(
                "Cookie", ""
            ):
                return self._send(Served(body))
            if query.get("confirm") == ["link-7"]:
                return self._send(Served(body))
            title = "<title>Google Drive - Virus scan warning</title>"
            if kind == "form":
                page = (
                    f"<html><head>{title}</head><body><p>Google Drive can't scan this file for viruses.</p>"
                    f'<form id="download-form" action="{server.base}/download" method="get">'
                    f'<input type="submit" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{file_id}">'
                    '<input type="hidden" name="export" value="download">'
                    '<input type="hidden" name="confirm" value="t">'
                    '<input type="hidden" name="uuid" value="u-1"></form></body></html>'
                )
                return self._page(page)
            if kind == "link":
                href = f"/uc?export=download&amp;confirm=link-7&amp;id={file_id}"
                return self._page(
                    f'<html><head>{title}</head><body><a href="{href}">Download anyway</a></body>'
                )
            if kind == "cookie":
                return self._page(
                    f"<html><head>{title}</head></html>", cookie="download_warning_1=tok-42; Path=/"
                )
            return self._page("<html><head><title>Google Drive - Quota exceeded</title></head></html>")

        def _page(self, html: str, cookie: str | None = None) -> None:
            data = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if cookie:
                self.send_header("Set-Cookie", cookie)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, served: Served) -> None:
            time.sleep(served.delay_s)
            body, start = served.body, 0
            range_header = self.headers.get("Range")
            if range_header and not served.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    return self._error(416)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", served.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if served.truncate_first > 0:
                served.truncate_first -= 1
                cut = served.truncate_to if served.truncate_to is not None else len(payload) // 2
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    """Start the server on a free port of 127.0.0.1; stop it on exit."""
    state = LoopbackServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def closed_port() -> int:
    """A port of 127.0.0.1 with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
