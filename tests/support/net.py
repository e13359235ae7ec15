"""The network as a test's client sees it: a free port, and requests to one."""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request


def free_port() -> int:
    """A loopback port that nothing listened on a moment ago (it is not held)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
