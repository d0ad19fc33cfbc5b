"""A small fault-injecting HTTP proxy for the storage tests: it sits on 127.0.0.1 in front of
moto's S3 server and forwards every request (method, path, headers, body) unchanged, except the
ones a rule picks, which it answers with an S3-style 5xx or holds back for a while (a stall).

Faults are deterministic: a rule matches a method and a regular expression on the path (with the
query string), and fires on the first `first` matches, on every `every`-th match, or always. The
proxy records every request and every injected fault, so a test can assert that its faults really
happened (and cannot pass vacuously).

Also the S3 settings the reliability tests share (bucket, credentials, storage options).
Not a test module (no `test_` prefix); imported by name (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers that describe one hop, not the message: never forwarded in either direction.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Rule:
    method: str                  # "GET", "PUT", "HEAD", ... or "*"
    path: re.Pattern             # searched in the request target (path + query)
    kind: str                    # "503", "500" or "stall"
    first: int | None = None     # fire on the first `first` matches ...
    every: int | None = None     # ... or on every `every`-th match (the every-th, 2*every-th, ...)
    stall_s: float = 0.0         # for "stall": how long to hold the request before forwarding it
    matched: int = 0
    fired: int = 0

    def fires(self, method: str, target: str) -> bool:
        if self.method not in ("*", method) or not self.path.search(target):
            return False
        self.matched += 1
        if self.first is not None:
            hit = self.matched <= self.first
        elif self.every is not None:
            hit = self.matched % self.every == 0
        else:
            hit = True  # always
        self.fired += hit
        return hit


@dataclass
class Injected:
    kind: str
    method: str
    target: str


@dataclass
class FaultProxy:
    upstream: str                                   # "http://127.0.0.1:PORT" (moto)
    rules: list[Rule] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    injected: list[Injected] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        up = urlsplit(self.upstream)
        self.up_host, self.up_port = up.hostname, up.port
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True  # a stalled handler never blocks shutdown
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ fault control (tests)
    def fail(self, method: str, path: str, *, first: int | None = None, every: int | None = None,
             status: int = 503) -> Rule:
        """Answer matching requests with `status` (503 ServiceUnavailable or 500 InternalError)."""
        return self._add(Rule(method, re.compile(path), str(status), first=first, every=every))

    def stall(self, method: str, path: str, seconds: float, *, first: int | None = None,
              every: int | None = None) -> Rule:
        """Hold matching requests for `seconds` before forwarding them (a slow or hung server)."""
        return self._add(Rule(method, re.compile(path), "stall", first=first, every=every, stall_s=seconds))

    def _add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.requests.clear()
            self.injected.clear()

    def count(self, kind: str | None = None, method: str | None = None, path: str | None = None) -> int:
        """Injected faults, optionally filtered by kind, method and a path regex."""
        with self.lock:
            return sum(1 for f in self.injected if (kind is None or f.kind == kind)
                       and (method is None or f.method == method) and (path is None or re.search(path, f.target)))

    def seen(self, method: str | None = None, path: str | None = None) -> int:
        """Requests received (faulted or not), optionally filtered."""
        with self.lock:
            return sum(1 for m, t in self.requests if (method is None or m == method)
                       and (path is None or re.search(path, t)))

    def _decide(self, method: str, target: str) -> Rule | None:
        with self.lock:
            self.requests.append((method, target))
            for rule in self.rules:
                if rule.fires(method, target):
                    self.injected.append(Injected(rule.kind, method, target))
                    return rule
        return None


S3_ERRORS = {"503": ("ServiceUnavailable", "Please try again (injected by the test proxy)."),
             "500": ("InternalError", "We encountered an internal error (injected by the test proxy).")}


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # every response carries Content-Length and `Connection: close`

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers, up to the blank line
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # CRLF after each chunk
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _handle(self):
            method, target = self.command, self.path
            body = self._body()  # always consume the request body, whatever the answer
            self.close_connection = True
            rule = proxy._decide(method, target)
            try:
                if rule is not None and rule.kind in S3_ERRORS:
                    self._send_error(int(rule.kind), *S3_ERRORS[rule.kind], method == "HEAD")
                    return
                if rule is not None and rule.kind == "stall":
                    time.sleep(rule.stall_s)  # the client has likely given up by now; forward anyway
                self._forward(method, target, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and went away (a stall): nothing to answer

        def _send_error(self, status: int, code: str, message: str, head: bool) -> None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f'<RequestId>fault-proxy</RequestId></Error>').encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(xml)

        def _forward(self, method: str, target: str, body: bytes) -> None:
            conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=30)
            try:
                # `Expect: 100-continue` was answered here already (BaseHTTPRequestHandler)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"expect"}}
                if body or method in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(method, target, body=body if body or method in ("PUT", "POST") else None,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()  # http.client undoes any chunking; objects here are small
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() in HOP_BY_HOP or (k.lower() == "content-length" and method != "HEAD"):
                        continue
                    self.send_header(k, v)
                if method != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


# ------------------------------------------------------------------------------------ S3 settings
BUCKET = "acs-faults"
KEY = "testing"
SECRET = "testing-secret-7d2b5a"


def storage_options(endpoint: str, read_timeout: float = 5.0) -> dict:
    """fsspec/s3fs options for the proxy: credentials, a read timeout (short, so that a stall is
    noticed quickly), and botocore's own retries off (`total_max_attempts: 1`) so that a fault
    reaches the pipeline's retry layer (`pipeline.storage.retry_io`), which is what is tested."""
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET,
            "config_kwargs": {"connect_timeout": 5, "read_timeout": read_timeout,
                              "retries": {"total_max_attempts": 1}}}
