"""Whether this install's relay is the compiled one, and what to say when it is not.

setup.py compiles the relay (the `proxy` package) and the balancer with mypyc at install. Where
that build fails (no C compiler, or no Python headers), the extensions are optional: pip
installs the same modules as plain Python, and says nothing about it unless run with
`-v`. The controller then relays as it would, for more CPU per request, and warns
(`relay_warning`) so that nobody runs that way without knowing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import shlex
import sys
import urllib.parse
from pathlib import Path

from rolehost.balancer import relay_build

# docs/benchmarks.md: the controller's instructions per relayed request, counted by
# `python bench/instructions.py` (callgrind) in the last runs, compiled and interpreted.
COMPILED_INSTRUCTIONS = 29_000
INTERPRETED_INSTRUCTIONS = 79_000


def relay_warning() -> dict[str, str] | None:
    """The fields of the `relay_interpreted` warning; None when the relay is compiled."""
    if relay_build() == "compiled":
        return None
    ratio = INTERPRETED_INSTRUCTIONS / COMPILED_INSTRUCTIONS
    return {
        "why": why_interpreted(),
        "cost": f"about {ratio:.1f}x the CPU instructions per relayed request "
                f"({INTERPRETED_INSTRUCTIONS:,} against {COMPILED_INSTRUCTIONS:,}, "
                "docs/benchmarks.md)",
        "fix": "install a C compiler and the Python headers (Debian, Ubuntu: apt-get "
               f"install gcc python3-dev), then reinstall rolehost: {reinstall_command()}",
    }


def why_interpreted() -> str:
    from rolehost.balancer.proxy import client  # the module that relays, as relay_build() looks

    folder = Path(client.__file__ or "").parent
    ours = importlib.machinery.EXTENSION_SUFFIXES
    others = sorted(p.name for p in folder.glob("client.*")
                    if p.suffix in (".so", ".pyd") and not p.name.endswith(tuple(ours)))
    if others:  # an editable install built by another interpreter
        return (f"the compiled extension was built for another Python ({', '.join(others)}), "
                f"not this one ({sys.implementation.cache_tag})")
    return ("the compiled extension is not installed: setup.py builds it at install, and "
            "where that build fails (no C compiler, or no Python headers) pip installs the "
            "relay as plain Python")


def reinstall_command() -> str:
    """The pip command that rebuilds this install, from the source it was installed from."""
    pip = f"{shlex.quote(sys.executable)} -m pip install --force-reinstall --no-deps"
    # The installed distribution's record of its source; a checkout's own rolehost.egg-info
    # (setuptools leaves one there) may come first on sys.path, and has none.
    origin = next((text for d in importlib.metadata.distributions(name="rolehost")
                   if (text := d.read_text("direct_url.json"))), None)
    where = json.loads(origin) if origin else {}
    url = str(where.get("url", ""))
    if url.startswith("file://") and "dir_info" in where:  # a checkout: pip install [-e] DIR
        path = shlex.quote(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        return f"{pip} -e {path}" if where["dir_info"].get("editable") else f"{pip} {path}"
    # From an index or a wheel: a wheel built without a compiler holds no extension.
    return f"{pip} --no-binary rolehost rolehost"
