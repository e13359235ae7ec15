"""The HTTP relay's bounds on a request head (issue 19): a Connection header cannot take
Host away; too many fields or too large a head is a 431, too long a target a 414, each
the balancer's own answer (not the instance's), at once, and the connection closes.
Requests within the bounds, pipelined ones too, go through as before."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from rolehost.testing import ServiceHarness
from support.net import free_port
from support.roles import WEB
from support.service import MakeService


def _exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` (from a thread: the balancer may answer and close before it took all
    of it); everything that comes back until the close."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        def send() -> None:
            # closed by the answer: the end this test expects of a refusal
            with contextlib.suppress(OSError):
                raw.sendall(data)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        finally:
            with contextlib.suppress(OSError):  # already closed by the other end
                raw.shutdown(socket.SHUT_RDWR)
            sender.join(30)
    return received


def _refused(answer: bytes, status: bytes, why: bytes) -> None:
    """The balancer's own refusal (text/plain, its message), closing the connection."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]
    assert b"Connection: close" in head and body == why, answer[:300]


def test_request_heads_are_bounded_and_host_stays(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(WEB, instances=1, settings={"warmup": "0,0,0,0"},
                           role={"stop_timeout": "5s"}, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        idle_timeout = "2s"
        """)
    with ServiceHarness(service.toml) as h:
        h.wait_ready(30)
        # A Connection header names Host: the instance gets it all the same.
        answer = _exchange(port, b"GET /headers HTTP/1.1\r\nHost: good\r\n"
                           b"Connection: close, Host, X-Internal\r\nX-Internal: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert b"\nHost: good\n" in answer and b"X-Internal" not in answer, answer

        fields = b"".join(b"X-F%d: v\r\n" % i for i in range(99))
        within = _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields +
                           b"Connection: close\r\n\r\n")  # 101 fields: Host, 99, Connection
        _refused(within, b"431", b"more than 100 header fields")
        # 90: relayed (the instance, Python's http.server, takes 100 at most itself).
        within = _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields[:-len(
            b"X-F98: v\r\n") * 10] + b"Connection: close\r\n\r\n")
        assert within.startswith(b"HTTP/1.1 200 ") and within.endswith(b"web_IN_0"), within

        # 16,000 fields: refused at the 101st, not parsed and kept to the end.
        began = time.monotonic()
        flood = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 16_000 + b"\r\n"
        _refused(_exchange(port, flood), b"431", b"more than 100 header fields")
        assert time.monotonic() - began < 5

        # A head of 13 fields of 8 KiB, in one read: over 64 KiB, though none ends late.
        big = b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 8192) for i in range(13))
        _refused(_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"),
                 b"431", b"request head too large")
        # A chunked body's trailer counts too.
        trailer = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" \
                  b"2\r\nhi\r\n0\r\n" + b"X-T: t\r\n" * 200 + b"\r\n"
        _refused(_exchange(port, trailer), b"431", b"more than 100 header fields")

        # Targets: 8 KiB passes, more is a 414; 20 MB is refused as soon as it passes 8 KiB.
        path = b"/headers?" + b"a" * (8192 - 9)
        ok = _exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
        assert ok.startswith(b"HTTP/1.1 200 ") and b"Target: " + path in ok, ok[:300]
        _refused(_exchange(port, b"GET %sa HTTP/1.1\r\nHost: x\r\n\r\n" % path),
                 b"414", b"request target longer than 8192 bytes")
        began = time.monotonic()
        huge = b"GET /" + b"a" * (20 * 1024 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        _refused(_exchange(port, huge), b"414", b"request target longer than 8192 bytes")
        assert time.monotonic() - began < 10

        # Bounds are per request: 50 pipelined requests of 20 fields each, in one read.
        each = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-P: p\r\n" * 19 + b"\r\n"
        answers = _exchange(port, each * 49 + each.replace(b"Host: x\r\n",
                                                           b"Host: x\r\nConnection: close\r\n"))
        assert answers.count(b"HTTP/1.1 200 ") == 50, answers[-300:]

        # A slowloris: a byte of its head every 0.2 s, never silent. Its head may take
        # idle_timeout (2 s), as a silent client may be silent that long; then it is cut.
        # Cut is told from never cut by the loop's own end (4 x idle_timeout), not by a
        # number of seconds: on a loaded machine the cut itself comes late.
        cut = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            began = time.monotonic()
            try:
                while time.monotonic() - began < 8:
                    slow.sendall(b"a")
                    time.sleep(0.2)
            except OSError:  # a reset, once cut
                cut = True
            took = time.monotonic() - began
        assert cut and took >= 2, f"the slow head went on for {took:.1f}s"
        assert h.instance("web/0")["restarts"] == 0
