"""The HTTP relay's bounds on a response head (issue 19): an instance is user code, and
its answer is as hostile as a client's request may be. A head over the bounds, or one
the client could frame otherwise than the relay did, fails the request with a 502 (with
nothing of it sent to the client), closes the connection to the instance (never back
in the keep-alive pool), is counted and logged as the relay's other 502s are; the other
clients see nothing of it."""

from __future__ import annotations

import http.client
import socket
import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from rolehost.testing import ServiceHarness, wait_until
from support.net import free_port, get
from support.roles import HTTP_SITE
from support.service import MakeService

# The instance answers each path with these bytes, raw, then waits to see what the relay
# does with the connection: closes it ("closed"), or sends it the next request ("reused").
HOSTILE = HTTP_SITE + r'''
import socket

RAW = {
    "/fields-100": b"HTTP/1.1 200 OK\r\n" + b"X-F: v\r\n" * 99 + b"Content-Length: 2\r\n\r\nok",
    "/fields-101": b"HTTP/1.1 200 OK\r\n" + b"X-F: v\r\n" * 100 + b"Content-Length: 0\r\n\r\n",
    "/trailer-flood": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"2\r\nhi\r\n0\r\n" + b"X-T: t\r\n" * 200 + b"\r\n",
    # 13 fields of 8 KiB in one write: none long, the head over 64 KiB all the same
    "/big": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 8192)
                                              for i in range(13)) + b"Content-Length: 0\r\n\r\n",
    "/status-99": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "/status-600": b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    "/status-line": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "/version": b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "/reason": b"HTTP/1.1 200 O\x00K\x7f\r\nContent-Length: 0\r\n\r\n",
    "/name": b"HTTP/1.1 200 OK\r\nX Bad: a\r\nContent-Length: 0\r\n\r\n",
    "/fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "/lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    # a response smuggled into the client's kept-alive connection, by either framing
    "/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle",
    "/te-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n"
              b"2c\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle\r\n0\r\n\r\n",
    "/chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "/chunked-first": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhi",
    "/switch": b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nhi",
    # faulty framing by definition (RFC 9112, 6.1): relayed, but the connection not reused
    "/http10-chunked": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
}

class Handler(Site):
    verdicts = []

    def do_GET(self):
        if self.path == "/verdicts":
            return self.reply(200, " ".join(Handler.verdicts).encode())
        raw = RAW.get(self.path)
        if raw is None:
            return self.reply(200, RoleEnvironment.current_instance.id.encode())
        self.wfile.write(raw)
        self.wfile.flush()
        if self.path == "/fields-100":  # a good answer: the connection carries on
            return
        if self.path == "/chunked-first":  # its body ends with the close
            self.connection.shutdown(socket.SHUT_WR)
        self.close_connection = True
        self.connection.settimeout(10)
        try:
            verdict = "reused" if self.connection.recv(65536) else "closed"
        except ConnectionResetError:
            verdict = "closed"
        except TimeoutError:
            verdict = "kept"
        Handler.verdicts.append(f"{self.path}={verdict}")

class Role(Serving):
    handler = Handler
'''

REFUSED = {  # path: the reason the backend_failed event gives
    "/fields-101": "more than 100 header fields in the response",
    "/trailer-flood": "more than 100 header fields in the response",  # a trailer's count too
    "/big": "response head too large",
    "/status-99": "status 99 in the response",
    "/status-600": "status 600 in the response",
    "/status-line": "malformed response: Invalid status code",
    "/version": "malformed response: Invalid HTTP version",
    "/reason": "a control character in the response's reason phrase",
    "/name": "malformed response: Invalid header token",
    "/fold": "malformed response: Unexpected whitespace after header value",
    "/lengths": "malformed response: Duplicate Content-Length",
    "/cl-te": "malformed response: Transfer-Encoding can't be present with Content-Length",
    "/te-cl": "malformed response: Content-Length can't be present with Transfer-Encoding",
    "/chunked-twice": "a response chunked twice, or not last",
    "/chunked-first": "a response chunked twice, or not last",
    "/switch": "a 101 answer to a request that asked for no upgrade",
}


def _errors(h: ServiceHarness) -> dict[str, float]:
    """rolehost_balancer_errors_total of the endpoint, by kind."""
    found = {}
    for family in text_string_to_metric_families(h.client.request_raw("GET", "/v1/metrics")):
        for sample in family.samples:
            if (sample.name == "rolehost_balancer_errors_total"
                    and sample.labels["endpoint"] == "web.http"):
                found[sample.labels["kind"]] = sample.value
    return found


def _failed(h: ServiceHarness, path: str) -> dict[str, Any]:
    """The backend_failed event of the request for `path`."""
    return h.wait_event(lambda e: e["event"] == "backend_failed" and e["url"] == path, 10)


def _exchange(port: int, request: bytes) -> bytes:
    """Everything that comes back for `request`, until the close."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(request)
        while chunk := raw.recv(65536):
            received += chunk
    return received


def test_hostile_response_heads_are_a_502_and_the_connection_is_closed(
        make_service: MakeService) -> None:
    port = free_port()
    service = make_service(HOSTILE, instances=1, role={"stop_timeout": "5s"}, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        """)
    with ServiceHarness(service.toml) as h:
        h.wait_ready(30)
        # A client on a kept-alive connection all along: served throughout.
        stop, answers = threading.Event(), []

        def steady() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                while not stop.is_set():
                    connection.request("GET", "/")
                    response = connection.getresponse()
                    answers.append((response.status, response.read()))
            finally:
                connection.close()

        bystander = threading.Thread(target=steady)
        bystander.start()
        try:
            # Within the bounds: 100 fields pass.
            within = _exchange(port, b"GET /fields-100 HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
            assert within.startswith(b"HTTP/1.1 200 ") and within.endswith(b"\r\n\r\nok"), within
            assert within.count(b"\r\nX-F: v") == 99, within
            for path, reason in REFUSED.items():
                status, body = get(port, path)
                assert (status, body) == (502, b"the instance failed before it answered"), path
                assert _failed(h, path)["reason"] == reason, path
                # The next request is served, by the same instance (no retry elsewhere,
                # no restart), and gets its own answer: nothing was smuggled in.
                assert get(port) == (200, b"web_IN_0"), path
            # HTTP/1.0 with a Transfer-Encoding: relayed as parsed, then the close.
            assert get(port, "/http10-chunked") == (200, b"hi")
            # An Upgrade's answer is bounded too, and its 502 counted.
            upgrade = _exchange(port, b"GET /fields-101 HTTP/1.1\r\nHost: x\r\n"
                                b"Upgrade: echo\r\nConnection: Upgrade\r\n\r\n")
            assert upgrade.startswith(b"HTTP/1.1 502 ") and upgrade.endswith(
                b"the instance sent a malformed response"), upgrade
        finally:
            stop.set()
            bystander.join(30)
        assert answers and all(a == (200, b"web_IN_0") for a in answers), answers[-3:]

        # Every connection that carried a refused answer was closed, none reused.
        expected = sorted(f"{path}=closed" for path in [*REFUSED, "/http10-chunked",
                                                        "/fields-101"])

        def verdicts() -> list[str] | None:
            found = sorted(get(port, "/verdicts")[1].decode().split())
            return found if len(found) >= len(expected) else None
        assert wait_until(verdicts, 30, "every hostile connection's verdict") == expected

        errors = _errors(h)
        # Each refused answer was tried once more (a GET, on another instance were there
        # one), then answered 502; the Upgrade's is not retried.
        assert errors == {"retry": len(REFUSED), "502": len(REFUSED) + 1}, errors
        assert h.instance("web/0")["restarts"] == 0
