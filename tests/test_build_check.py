"""The suite stops on a stale build of the relay, whichever of tests/ and samples/ it runs;
and the relay says whether it runs compiled."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rolehost import balancer

ROOT = Path(__file__).resolve().parent.parent
SO = importlib.machinery.EXTENSION_SUFFIXES[0]


def _root_conftest() -> ModuleType:
    # Under a name of its own: "conftest" is this folder's, in sys.modules already.
    spec = importlib.util.spec_from_file_location("rolehost_root_conftest", ROOT / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(tmp_path: Path, module: str, source_age: float, build_age: float) -> Path:
    """A package with `module` ("balancer", or "proxy/client" in a subpackage, where the
    relay's modules are built) and its build, each `age` seconds old; and a build with no
    source beside it (mypyc's shared library is one)."""
    now = 1_800_000_000.0
    (tmp_path / "proxy").mkdir()
    for name, age in ((module + ".py", source_age), (module + SO, build_age),
                      ("lonely" + SO, 0.0), ("proxy/__init__.py", 0.0)):
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (now - age, now - age))
    return tmp_path


@pytest.mark.parametrize("module", ["balancer", "proxy/client"])
def test_a_source_edited_after_its_build_is_stale(tmp_path: Path, module: str) -> None:
    package = _package(tmp_path, module, source_age=10, build_age=60)
    assert _root_conftest().stale_builds(package) == [(package / (module + ".py"),
                                                       package / (module + SO))]
    name = module.rpartition("/")[2]
    with pytest.raises(pytest.exit.Exception, match=rf"{name}\.py changed after it was compiled"):
        _root_conftest().refuse_stale_builds(package)


@pytest.mark.parametrize("module", ["balancer", "proxy/client"])
def test_a_build_newer_than_its_source_is_not(tmp_path: Path, module: str) -> None:
    package = _package(tmp_path, module, source_age=60, build_age=10)
    assert _root_conftest().stale_builds(package) == []
    _root_conftest().refuse_stale_builds(package)


@pytest.mark.parametrize("target", ["samples/hello", "tests/test_units.py"])
def test_the_check_runs_for_the_samples_alone_too(target: str) -> None:
    # The header comes from the same conftest.py as the check: pytest loaded it.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", target],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rolehost relay: " in done.stdout


def test_the_relay_says_whether_it_runs_compiled(tmp_path: Path) -> None:
    """`relay_build()` (the controller's `relay=`, the suite's header): "compiled" when the
    relay's modules are built (it asks one that relays, not the package's `__init__`),
    "interpreted" run from a copy of the package without the extensions."""
    built = any((ROOT / "rolehost" / "balancer" / "proxy").glob("client" + SO))
    assert balancer.relay_build() == ("compiled" if built else "interpreted")
    shutil.copytree(ROOT / "rolehost", tmp_path / "rolehost",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-c", "from rolehost import balancer; print(balancer.relay_build())"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interpreted"
