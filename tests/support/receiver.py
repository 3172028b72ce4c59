"""A callback receiver on loopback, as a customer would write one from the Standard Webhooks spec.

It checks signatures with the spec's algorithm written out here (not ``worker.signing``, so the
sender is checked against the spec, not against itself): the key is the base64 after ``whsec_``,
the signed content ``{webhook-id}.{webhook-timestamp}.{body}``, HMAC-SHA256, base64, ``v1,``
prefix, any of the space-separated signatures may match. It refuses timestamps more than
``tolerance`` seconds from its clock (400: a replay) and bad signatures (401), and answers 500 to
the first ``fail_first`` good deliveries of a route, to exercise the sender's retries.

    rx = Receiver().start()
    rx.expect("ci", secrets=[...], fail_first=2)    # POST {rx.url}/ci
    rx.received                                     # every request, with what was answered
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    secrets: list[str]
    fail_first: int = 0
    fail_always: bool = False
    good: int = 0  # deliveries whose signature verified


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    verdict: str  # ok | failing on purpose | replay | bad signature | ...


@dataclass
class Receiver:
    tolerance: int = 300
    skew: float = 0.0  # seconds added to the receiver's clock (to replay "later")
    routes: dict[str, Route] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def expect(self, name: str, secrets: list[str], fail_first: int = 0,
               fail_always: bool = False) -> str:
        """Accept POST /{name}, verified with ``secrets``; returns its URL."""
        self.routes[f"/{name}"] = Route(list(secrets), fail_first, fail_always)
        return f"{self.url}/{name}"

    def delivered(self, name: str) -> list[Received]:
        """The deliveries of ``name`` that were verified and answered 2xx."""
        return [r for r in self.received if r.path == f"/{name}" and r.status < 300]

    def wait_for(self, name: str, count: int = 1, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(got := self.delivered(name)) >= count:
                return got
            time.sleep(0.1)
        seen = [(r.path, r.status, r.verdict) for r in self.received]
        raise AssertionError(f"{name}: {len(self.delivered(name))} of {count} deliveries after "
                             f"{timeout} s; received {seen}")

    def check(self, route: Route, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        msg_id = headers.get("webhook-id")
        stamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and stamp and signatures):
            return 400, "missing header"
        if not stamp.isdigit() or abs(time.time() + self.skew - int(stamp)) > self.tolerance:
            return 400, "replay"
        content = f"{msg_id}.{stamp}.".encode() + body
        expected = {"v1," + base64.b64encode(hmac.new(
            base64.b64decode(secret.removeprefix("whsec_")), content, hashlib.sha256).digest())
            .decode() for secret in route.secrets}
        if not any(hmac.compare_digest(sig, want) for sig in signatures.split(" ")
                   for want in expected):
            return 401, "bad signature"
        route.good += 1
        if route.fail_always or route.good <= route.fail_first:
            return 500, "failing on purpose"
        return 204, "ok"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                """Quiet: tests read ``received``."""

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                route = receiver.routes.get(self.path)
                status, verdict = (404, "no route") if route is None else \
                    receiver.check(route, headers, body)
                receiver.received.append(Received(self.path, headers, body, status, verdict))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
