"""Compiles the balancer's hot path with mypyc; everything else is in pyproject.toml.

The relay (`rolehost/proxy.py`) and the balancer it calls on every request
(`rolehost/balancer.py`) are plain typed Python; mypyc turns them into C extensions,
which halves the instructions the controller spends per relayed request. The modules
run the same uncompiled: without a C compiler the build says so and installs them as
Python (the extensions are optional). An editable install builds the extensions next to
the sources, so after editing one of them, reinstall (`make` does it; the test suite
refuses to run against a stale build).
"""

from mypyc.build import mypycify
from setuptools import setup

COMPILED = ["rolehost/proxy.py", "rolehost/balancer.py"]

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
