"""support.net's ports: never one that another test process holds, nor one the kernel
or rolehost's instances may take meanwhile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rolehost.fabric import ports
from support import net

CLAIMS = """
import sys
sys.path.insert(0, sys.argv[1])
from support.net import free_port
print(free_port(), flush=True)
sys.stdin.read()  # held until the test lets go
"""


def test_a_port_another_process_holds_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two xdist workers (or two checkouts' runs) drawing the same port: the second
    goes on to another, though nothing listens on it yet."""
    other = subprocess.Popen([sys.executable, "-c", CLAIMS, str(Path(__file__).parent)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        held = int(other.stdout.readline())
        draws = [held]
        real = net.random.randrange
        monkeypatch.setattr(net.random, "randrange",
                            lambda a, b: draws.pop() if draws else real(a, b))
        given = net.free_port()
        assert not draws and given != held
    finally:
        assert other.stdin is not None
        other.stdin.close()
        assert other.wait(10) == 0
    # Let go when its process ended: the kernel drops the claim with it.
    draws.append(held)
    assert net.free_port() == held


def test_ports_are_below_what_the_kernel_and_the_instances_take() -> None:
    first = net.free_ports(3)
    assert net.free_port() not in range(first, first + 3)
    assert first + 2 < ports.private_range().start  # below it, the ephemeral range
