"""A child's exit is delivered even when the work before its reap fails."""

from __future__ import annotations

import asyncio
import os
import subprocess

import psutil
import pytest
import structlog
import uvloop

from rolehost.processes import process


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_exit_delivered_when_before_reap_fails(loop: str) -> None:
    seen: list[bool] = []
    pids: list[int] = []

    async def main() -> int:
        child = subprocess.Popen(["sh", "-c", "exit 7"])
        pids.append(child.pid)

        async def before_reap() -> None:
            seen.append(psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
            raise OSError(9, "Bad file descriptor")  # what a stolen descriptor looks like

        return await asyncio.wait_for(process.watch_exit(child.pid, before_reap), 10)

    with structlog.testing.capture_logs() as logs:
        code = (uvloop.run if loop == "uvloop" else asyncio.run)(main())
    assert code == 7
    assert seen == [True]  # it ran while the child was a zombie
    assert [e["event"] for e in logs] == ["before_reap_failed"]
    assert "Bad file descriptor" in logs[0]["error"]
    with pytest.raises(ChildProcessError):  # reaped: nothing left to wait for
        os.waitpid(pids[0], os.WNOHANG)
