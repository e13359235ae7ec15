"""Shared fixtures: services written to a temporary folder, run by a real controller.
(The check of the relay's build is the whole suite's: ../conftest.py. What tests share
besides fixtures is in tests/support.)"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from support.roles import PRELUDE
from support.service import MakeService, Service


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
