"""An interpreter that users other than root can run, for the tests of a root controller
that drops privileges: the one running the tests may be closed to them (pyenv keeps it
under /root, which is 0700)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import rolehost
from rolehost.processes import privileges


@pytest.fixture(scope="module")
def reachable_python() -> Iterator[Path]:
    """A virtual environment of the system's Python that `nobody` can run: rolehost copied
    in, its dependencies (for the root controller only) taken from this environment."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = next((Path(d, version) for d in ("/usr/bin", "/usr/local/bin")
                   if Path(d, version).exists()), None)
    if system is None:
        pytest.skip(f"no system {version} to build an environment nobody can run")
    folder = Path(tempfile.mkdtemp(prefix="rolehost-sysenv-"))
    try:
        os.chmod(folder, 0o755)
        subprocess.run([system, "-m", "venv", "--without-pip", folder / "venv"], check=True,
                       timeout=60)
        python = folder / "venv" / "bin" / "python"
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=30).stdout.strip()
        shutil.copytree(Path(rolehost.__file__).parent, Path(purelib, "rolehost"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        problem = privileges.check(privileges.User.named("nobody"), folder, str(python))
        if problem is not None:
            pytest.skip(f"the system's Python is closed to nobody too: {problem}")
        yield python
    finally:
        shutil.rmtree(folder, ignore_errors=True)
