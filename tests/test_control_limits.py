"""The control API faces hostile bytes too (issue 19): whatever a request holds, it is
answered with a 4xx that says what was wrong, bounded in size, and the controller goes
on serving; none is a 500 (a bug, by the API's own table) or a hang."""

from __future__ import annotations

import contextlib
import re
import socket
import threading

from support.roles import IDLE
from support.service import MakeService


def _exchange(path: str, request: bytes) -> bytes:
    """Send `request` on a connection of its own; what comes back until the close (or
    10 s of silence). A request the API stops reading (it answered and closed) is cut
    short: its sending thread's error is the expected end, not the test's."""
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(path)

    def send() -> None:
        with contextlib.suppress(OSError):
            raw.sendall(request)

    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    try:
        while data := raw.recv(65536):
            answer += data
            if b"Connection: keep-alive" in answer and answer.endswith(b"}"):
                break
    except (TimeoutError, ConnectionResetError):
        pass
    with contextlib.suppress(OSError):  # already closed by the other end
        raw.shutdown(socket.SHUT_RDWR)
    sender.join(30)
    raw.close()
    return answer


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1.1 (\d+) ", answer)
    assert match, answer[:300]
    return int(match.group(1))


def test_hostile_requests_get_a_bounded_4xx_and_the_api_goes_on(
        make_service: MakeService) -> None:
    service = make_service(IDLE)
    with service.harness() as h:
        pid = h.wait_ready(30)["instances"][0]["pid"]
        path = str(h.run_dir.socket)

        def ask(head: bytes, body: bytes = b"") -> bytes:
            length = b"Content-Length: %d\r\n" % len(body) if body else b""
            return _exchange(path, head + b"\r\nHost: x\r\n" + length + b"\r\n" + body)

        # A body nested deeper than the JSON decoder's recursion: a bad body, not a bug.
        deep = ask(b"POST /v1/operations/recycle HTTP/1.1", b"[" * 100_000 + b"]" * 100_000)
        assert _status(deep) == 400 and b'"kind": "invalid"' in deep, deep[:300]
        assert b"nested too deeply" in deep
        # Digits str.isdigit() takes and int() does not; more digits than int() takes.
        for since in ("%C2%B2", "9" * 5000, "-1", "1e3"):
            bad = ask(b"GET /v1/events?since=%s HTTP/1.1" % since.encode())
            assert _status(bad) == 400 and b"since must be a non-negative integer" in bad, \
                (since, bad[:300])
        # A target urlsplit() refuses (a broken IPv6 authority): answered, not a hang.
        broken = ask(b"GET //[x/v1/status HTTP/1.1")
        assert _status(broken) == 400 and b"malformed request target" in broken, broken
        # A long path, within the bound: the 404 repeats only its beginning.
        long = ask(b"GET /" + b"a" * 5000 + b" HTTP/1.1")
        assert _status(long) == 404 and len(long) < 600, len(long)
        assert b"(5001 characters)" in long
        # A 20 MB target: 414 once the bound is passed; not read whole, never echoed.
        huge = ask(b"GET /" + b"a" * (20 * 1024 * 1024) + b" HTTP/1.1")
        assert _status(huge) == 414 and len(huge) < 600, huge[:600]
        assert b"request target longer than 8192 bytes" in huge
        assert b"Connection: close" in huge
        # The controller went on, the instance untouched (the deep body was no recycle).
        row = h.status()["instances"][0]
        assert (row["state"], row["pid"], row["restarts"]) == ("ready", pid, 0)
