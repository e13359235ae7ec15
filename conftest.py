"""The whole suite's: tests/ and each samples/*/ (pyproject's testpaths), whichever of them
a session runs. The samples' tests start controllers too, and so run the compiled relay,
and can leak processes and folders as much as tests/ can (the leak check: tests/leakcheck.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import rolehost
from rolehost import balancer


def stale_builds(package: Path) -> list[tuple[Path, Path]]:
    """(source, build) for each module of `package` compiled by mypyc whose source changed
    after the build, in its subpackages too (the relay's modules are built in
    rolehost/balancer/proxy/). By the files, not by what this process imported: a samples-only run
    imports no relay itself, its controllers do."""
    stale = []
    for built in sorted(package.rglob("*.so")):
        source = built.with_name(built.name.partition(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            stale.append((source, built))
    return stale


def refuse_stale_builds(package: Path) -> None:
    """Stop the session on an editable install's build of code edited since (setup.py):
    the tests would pass or fail on the old code."""
    for source, built in stale_builds(package):
        pytest.exit(f"{source} changed after it was compiled into {built.name}: "
                    "reinstall (`pip install -e .`, or `make test`) and run again", 2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-transcripts", action="store_true",
                     help="rewrite docs/getting-started.md's transcripts from a real run "
                          "(tests/test_getting_started.py)")


def pytest_report_header() -> str:
    return f"rolehost relay: {balancer.relay_build()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    refuse_stale_builds(Path(rolehost.__file__).parent)


def pytest_configure(config: pytest.Config) -> None:
    # Loaded by its path: a samples-only run does not put tests/ on sys.path. Under its
    # own name, so that `import leakcheck` in a test gets this module, not a second copy.
    path = Path(__file__).parent / "tests" / "leakcheck.py"
    spec = importlib.util.spec_from_file_location("leakcheck", path)
    assert spec is not None and spec.loader is not None
    leakcheck = sys.modules.setdefault("leakcheck", importlib.util.module_from_spec(spec))
    if not hasattr(leakcheck, "LeakCheck"):
        spec.loader.exec_module(leakcheck)
    leakcheck.pytest_configure(config)
