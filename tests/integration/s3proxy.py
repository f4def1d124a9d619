"""A loopback HTTP proxy in front of the S3 server that injects faults: 503 SlowDown, a connection reset,
or 403 AccessDenied, for the requests a test picks. The client under test talks to the proxy as its endpoint.

With ``keys`` set, it also checks credentials as S3 does and moto does not: a request signed with any
other access key gets 403 InvalidAccessKeyId."""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# (method, path with query) -> None (forward), "503", "reset" or "403"
Fault = Callable[[str, str], str | None]

_BODIES = {
    "503": b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    "403": b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
    "403-key": b"<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist "
               b"in our records.</Message></Error>",
}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.fault: Fault = lambda method, path: None
        self.injected: list[tuple[str, str, str]] = []
        self.keys: set[str] | None = None  # the access keys the store knows; None: any
        self.lock = threading.Lock()

    def decide(self, method: str, path: str, authorization: str = "") -> str | None:
        with self.lock:
            signed = _CREDENTIAL.search(authorization)
            if self.keys is not None and (signed is None or signed.group(1) not in self.keys):
                kind: str | None = "403-key"
            else:
                kind = self.fault(method, path)
            if kind is not None:
                self.injected.append((kind, method, path))
            return kind


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            kind = proxy.decide(self.command, self.path, self.headers.get("Authorization") or "")
            if kind == "reset":
                self.close_connection = True
                self.connection.close()
                return
            if kind is not None:
                data = _BODIES[kind]
                self.send_response(int(kind[:3]))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if self.command != "HEAD" else b"")
                return
            conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    return Handler


@contextmanager
def fault_proxy(upstream: str) -> Iterator[tuple[str, FaultProxy]]:
    """Serve a FaultProxy to ``upstream`` on 127.0.0.1 (a free port); yield (its endpoint, the proxy)."""
    proxy = FaultProxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
