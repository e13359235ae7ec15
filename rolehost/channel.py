"""The host's end of the socket pair it shares with the controller: newline-delimited
JSON messages (rolehost/protocol.py) in, and out with a heartbeat while it is quiet.
Imported by the host process, so it stays cheap to import."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from rolehost import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Channel:
    """The host's end of the socket pair."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # the role's own children must not hold it open
        self.sock = socket.socket(fileno=fd)
        self._lock = threading.Lock()
        self._buffer = b""

    def receive(self) -> protocol.Message | None:
        """Block for one message; None at EOF."""
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return protocol.decode(line)

    def send(self, type: str, **fields: Any) -> None:
        data = protocol.encode({"type": type, **fields})
        # An OSError means the controller is gone; the channel thread is taking us down.
        with self._lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def serve(self, dispatch: Callable[[protocol.Message], None],
              interval: float = protocol.HEARTBEAT_INTERVAL) -> None:
        """Read messages until EOF; send a heartbeat every `interval` seconds (the
        `heartbeat` of `assign`)."""
        buffer, self._buffer = self._buffer, b""
        next_beat = time.monotonic() + interval
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            dispatch(protocol.decode(line))
        # poll, not select: with a few hundred instances, the controller's end of the
        # channel, and so this one, is past descriptor 1024, which select() refuses.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            wait = max(0.0, next_beat - time.monotonic())
            readable = poller.poll(wait * 1000)
            if time.monotonic() >= next_beat:  # due, even while the controller talks
                self.send("heartbeat")
                next_beat = time.monotonic() + interval
            if not readable:
                continue
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                dispatch(protocol.decode(line))
