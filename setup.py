"""Compiles the balancer's hot path with mypyc; everything else is in pyproject.toml.

The relay (the `rolehost/balancer/proxy/` package) and the balancer it calls on every request
(`rolehost/balancer/__init__.py`) are plain typed Python; mypyc turns them into C extensions,
which cuts the instructions the controller spends per relayed request to about a third.
The modules run the same uncompiled: without a C compiler the build warns (pip shows it
only with -v) and installs them as Python (the extensions are optional); the controller
then warns too (rolehost/balancer/build.py). An editable install builds the extensions next to
the sources, so after editing one of them, reinstall (`make` does it; the test suite
refuses to run against a stale build).
"""

from pathlib import Path

from mypyc.build import mypycify
from setuptools import setup

# Every module of the relay's package (one added to it is compiled too) and the balancer:
# one group, built together, so that they call each other natively.
COMPILED = [*sorted(path.as_posix() for path in Path("rolehost/balancer/proxy").glob("*.py")),
            "rolehost/balancer/__init__.py"]

# The build sees no installed package (--no-site-packages), only the standard library's
# types: otherwise what it compiles would depend on whether the dependencies happened to
# be installed when pip built it (a fresh venv builds before it installs them). So no
# compiled class may derive from a dependency's class. The project's strict settings
# would fail on those untyped stand-ins, so the build reads no config file either (`mypy`,
# run on its own with every dependency installed, holds the code to strict).
extensions = mypycify(["--config-file=", "--no-site-packages", "--ignore-missing-imports",
                        *COMPILED],
                      group_name="rolehost")
for extension in extensions:
    extension.optional = True

setup(ext_modules=extensions)
