"""The network as a test's client sees it: a free port, and requests to one."""

from __future__ import annotations

import errno
import http.client
import random
import socket
import urllib.error
import urllib.request

from rolehost.fabric import ports

# A port a test names in a definition is bound by the controller a moment later. A port
# the kernel chose (a bind to port 0) was free when chosen, but the kernel may then hand
# it to any outgoing connection as its local port, or to another bind to 0, and the
# controller's bind fails (CI, under load: the metrics scrape). So the ports come from
# below the instances' private range, which is below the ephemeral one: there the kernel
# gives nothing on its own, and only another test can want one. Tests agree through one
# abstract unix socket per port, bound by the process that took the port and held while
# it lives: every test process on the machine (xdist's workers, another checkout's run)
# skips a port held so. No file: the kernel drops the name when the process ends.
_SPAN = range(20000, ports.private_range().start)
_held: list[socket.socket] = []


def _claim(port: int) -> socket.socket | None:
    """This process's claim on `port`, or None when another process holds it."""
    claim = socket.socket(socket.AF_UNIX)
    try:
        claim.bind(f"\0rolehost-test-port-{port}")
    except OSError as exc:
        claim.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return claim


def _free(port: int) -> bool:
    """Nothing outside the tests listens on `port` (a program of the machine's own)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports that no other test of the machine
    has taken, that nothing listens on, and that the kernel will not give away meanwhile;
    this process keeps them for its lifetime."""
    for _ in range(1000):
        first = random.randrange(_SPAN.start, _SPAN.stop - count + 1)
        claims = []
        for port in range(first, first + count):
            claim = _claim(port)
            if claim is None or not _free(port):
                if claim is not None:
                    claim.close()
                break
            claims.append(claim)
        if len(claims) == count:
            _held.extend(claims)
            return first
        for claim in claims:
            claim.close()
    raise RuntimeError(f"no {count} consecutive free ports in {_SPAN}")


def free_port() -> int:
    """A loopback port for a test to name: see free_ports."""
    return free_ports(1)


def get(port: int, path: str = "/", timeout: float = 30) -> tuple[int, bytes]:
    """GET on 127.0.0.1:port: the status and the body. A failure to connect raises."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answer(port: int, path: str, method: str = "GET") -> int:
    """The status of a request to 127.0.0.1:port, 0 when nothing answered."""
    return answer_and_body(port, path, method)[0]


def answer_and_body(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """The status and the body of a request to 127.0.0.1:port; (0, "") when nothing
    answered, so that a test can wait for an answer."""
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""
