"""rolehost's pytest plugin (entry point `pytest11`): rehearse your service in your tests.

    @pytest.mark.rolehost("rolehost.toml")
    def test_restart_under_load(rolehost_service):
        rolehost_service.wait_ready(timeout=60)
        with LoadProbe(rolehost_service.url("web", "http")) as load:
            rolehost_service.restart("web/0")
        assert load.failures == []

    def test_worker_unit(rolehost_role):
        with rolehost_role(Worker, settings={"greeting": "hi"}) as role:
            assert role.start()

The definition comes from the `rolehost` marker, else the `rolehost_definition` ini
option, else `rolehost.toml` in pytest's root folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rolehost.testing import RoleRun, ServiceHarness, run_role


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("rolehost_definition", "rolehost.toml for the rolehost_service fixture")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "rolehost(definition): the rolehost.toml the rolehost_service fixture runs"
    )


@pytest.fixture
def rolehost_service(request: pytest.FixtureRequest) -> Iterator[ServiceHarness]:
    """A controller for the service, started before the test and stopped after it; the
    test fails if any process of the service outlives it."""
    marker = request.node.get_closest_marker("rolehost")
    root = Path(str(request.config.rootpath))
    if marker is not None and marker.args:
        definition = Path(marker.args[0])
        if not definition.is_absolute():
            definition = Path(str(request.node.path)).parent / definition
    else:
        configured = request.config.getini("rolehost_definition")
        definition = root / (configured or "rolehost.toml")
    with ServiceHarness(definition) as service:
        yield service


@pytest.fixture
def rolehost_role() -> Iterator[Callable[..., RoleRun]]:
    """`rolehost_role(RoleClass, settings=..., resources=...)`: see rolehost.testing.run_role.
    Every role it ran is stopped and its folders removed after the test."""
    runs: list[RoleRun] = []

    def make(cls: type[Any], **options: Any) -> RoleRun:
        run = run_role(cls, **options)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()
