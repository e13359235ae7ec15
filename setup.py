"""Compiles the balancer's hot path with mypyc; everything else is in pyproject.toml.

The relay (`rolehost/proxy.py`) and what it calls on every request (`rolehost/balancer.py`,
the balancer's counters in `rolehost/metrics.py`) are plain typed Python; mypyc turns them
into C extensions, which halves the instructions the controller spends per relayed
request. The modules run the same uncompiled: without a C compiler the build says so and
installs them as Python (the extensions are optional). An editable install builds the
extensions next to the sources, so after editing one of them, reinstall (`make` does it;
the test suite refuses to run against a stale build).
"""

from mypyc.build import mypycify
from setuptools import setup

COMPILED = ["rolehost/proxy.py", "rolehost/balancer.py", "rolehost/metrics.py"]

# The build environment holds mypy only: the project's strict settings would fail on the
# untyped stand-ins for its dependencies, so the build reads no config file (`mypy`, run
# on its own with every dependency installed, holds the code to strict).
extensions = mypycify(["--config-file=", "--ignore-missing-imports", *COMPILED],
                      group_name="rolehost")
for extension in extensions:
    extension.optional = True

setup(ext_modules=extensions)
