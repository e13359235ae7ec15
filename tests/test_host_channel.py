"""The host's end of its channel to the controller, on a descriptor past 1024: with a
few hundred instances the controller's descriptors go past it, and a host inherits its
channel's number (select() refused it: every such host went silent and was killed as
unresponsive)."""

from __future__ import annotations

import os
import resource
import socket
import threading

import pytest

from rolehost import protocol
from rolehost.channel import Channel

HIGH_FD = 1500


def test_a_channel_past_descriptor_1024_is_served() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.skip(f"the hard descriptor limit ({hard}) is below {HIGH_FD}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 1), hard))
    ours, theirs = socket.socketpair()
    os.dup2(theirs.fileno(), HIGH_FD)
    theirs.close()
    channel = Channel(HIGH_FD)
    try:
        seen: list[protocol.Message] = []
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                channel.serve(seen.append)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        ours.sendall(protocol.encode({"type": "status_check"}))
        ours.shutdown(socket.SHUT_WR)  # EOF: serve returns
        thread.join(10)
        assert not thread.is_alive()
        assert errors == []
        assert seen == [{"type": "status_check"}]
    finally:
        ours.close()
        channel.sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_heartbeat_is_read_without_a_json_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller reads 250 heartbeats a second at 500 instances (issue 23): the line a
    host sends is known; any other line is parsed and checked as before."""
    line = protocol.encode({"type": "heartbeat"}).rstrip(b"\n")
    parsed = protocol.decode(protocol.encode({"type": "state", "state": "ready"}).rstrip(b"\n"))

    def no_parse(text: object) -> None:
        raise AssertionError("a JSON parse of a heartbeat")

    monkeypatch.setattr(protocol.json, "loads", no_parse)
    first = protocol.decode(line)
    assert first == {"type": "heartbeat"}
    first["seen"] = True  # each its own: what a reader does with one touches no other
    assert protocol.decode(line) == {"type": "heartbeat"}
    assert parsed == {"type": "state", "state": "ready"}
    with pytest.raises(AssertionError):
        protocol.decode(b'{"type": "heartbeat"}')  # spelt otherwise: parsed
