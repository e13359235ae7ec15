"""Shared fixtures: services written to a temporary folder, run by a real controller.
(The check of the relay's build is the whole suite's: ../conftest.py.)"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rolehost.testing import ServiceHarness, wait_until

# Roles append "EVENT INSTANCE_ID" lines to the file in setting `probe`, so a test can
# see which lifecycle methods ran, in which order, in which process.
PRELUDE = '''
import asyncio, os, signal, subprocess, sys, time
from rolehost import RoleEntryPoint, RoleEnvironment, RoleStatus

def probe(event):
    with open(RoleEnvironment.get_setting("probe"), "a") as f:
        f.write(f"{event} {RoleEnvironment.current_instance.id}\\n")
'''


@dataclass
class Service:
    toml: Path
    probe: Path

    def harness(self, **kwargs: object) -> ServiceHarness:
        return ServiceHarness(self.toml, **kwargs)  # type: ignore[arg-type]

    def probes(self) -> list[str]:
        return self.probe.read_text().splitlines() if self.probe.exists() else []

    def count(self, event: str) -> int:
        return sum(1 for line in self.probes() if line.split()[0] == event)

    def wait_probe(self, line: str, timeout: float = 30.0) -> None:
        wait_until(lambda: line in self.probes(), timeout, f"probe {line!r}",
                   lambda: "\n".join(self.probes()))


MakeService = Callable[..., Service]


# A role whose stop a second signal cuts short: a child of on_start to kill with the
# host, and (setting `during` = "on_stop") an on_stop that would hold the stop 5 minutes.
HOLDS_ITS_STOP = """
    class Role(RoleEntryPoint):
        def on_start(self):
            subprocess.Popen(["sleep", "300"])  # a child the kill must take too
            return True
        def on_stop(self):
            probe("on_stop")
            if RoleEnvironment.get_setting("during") == "on_stop":
                time.sleep(300)
    """

# A role whose on_stop overruns stop_timeout: it sleeps on (setting `overrun` =
# "host-bounds-it": the host cuts it short), or freezes its host ("host-frozen": the
# supervisor kills it).
OVERRUNS_ITS_STOP = """
    class Role(RoleEntryPoint):
        def on_stop(self):
            probe("on_stop")
            if RoleEnvironment.get_setting("overrun") == "host-frozen":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(60)
    """

@pytest.fixture
def make_service(tmp_path: Path) -> MakeService:
    """make_service(role_source, instances=1, service={...}, role={...}) -> Service."""

    def make(
        source: str,
        instances: int = 1,
        service: dict[str, object] | None = None,
        role: dict[str, object] | None = None,
        settings: dict[str, object] | None = None,
        entry_point: str = "roles:Role",
        extra: str = "",
    ) -> Service:
        app = tmp_path / "app"
        app.mkdir(exist_ok=True)
        (app / "roles.py").write_text(PRELUDE + textwrap.dedent(source))
        probe = tmp_path / "probe.txt"
        svc = {"name": "test", "upgrade_domains": 2, **(service or {})}
        lines = ["[service]", *(f"{k} = {_toml(v)}" for k, v in svc.items()), "",
                 "[roles.web]", f'entry_point = "{entry_point}"', 'app = "app"',
                 f"instances = {instances}",
                 *(f"{k} = {_toml(v)}" for k, v in (role or {}).items()), "",
                 "[roles.web.settings]", f'probe = "{probe}"',
                 *(f"{k} = {_toml(v)}" for k, v in (settings or {}).items())]
        toml = tmp_path / "rolehost.toml"
        toml.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra))
        return Service(toml, probe)

    return make


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
