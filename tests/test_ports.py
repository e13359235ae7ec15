"""Private ports: below the kernel's ephemeral range, free, and never given twice."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rolehost.fabric import ports


def test_the_range_is_the_span_below_the_ephemeral_ports(tmp_path: Path) -> None:
    proc = tmp_path / "ip_local_port_range"
    proc.write_text("32768\t60999\n")
    assert ports.private_range(proc) == range(30000, 32768)
    proc.write_text("2000 65535\n")  # never below 1024
    assert ports.private_range(proc) == range(1024, 2000)
    proc.write_text("1024 65535\n")  # nothing left below it
    assert not ports.private_range(proc)
    assert ports.private_range(tmp_path / "missing") == range(30000, 32768)


def test_a_port_taken_or_listened_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ports of the private range: no outgoing connection takes them meanwhile.
    span = ports.private_range()
    monkeypatch.setattr(ports.random, "randrange", lambda n: 0)  # the scan starts at span[0]
    first = next(p for p in span if ports.choose("127.0.0.1", set(), range(p, p + 3)) == p)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", first))
        listener.listen()
        three = range(first, first + 3)
        assert ports.choose("127.0.0.1", {first + 1}, three) == first + 2
        with pytest.raises(OSError, match="no free private port"):
            ports.choose("127.0.0.1", {first + 1, first + 2}, three)


def test_without_a_range_the_kernel_chooses() -> None:
    port = ports.choose("127.0.0.1", set(), range(0))
    assert 0 < port < 65536


def test_the_machine_range_holds_no_ephemeral_port() -> None:
    span = ports.private_range()
    low = int(ports.EPHEMERAL.read_text().split()[0]) if ports.EPHEMERAL.exists() else 32768
    assert span and span.stop <= low
    assert ports.choose("127.0.0.1", set()) in span
