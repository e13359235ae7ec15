"""The `rolehost` command: parse, call the controller (or its API), print. One module per
group of commands; each registers its commands on the group in `common`."""

from __future__ import annotations

from rolehost.cli import imports, operations, portal, service, slots, tools
from rolehost.cli.common import cli

__all__ = ["cli", "imports", "main", "operations", "portal", "service", "slots", "tools"]


def main() -> None:
    cli(prog_name="rolehost")
