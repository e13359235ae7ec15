"""Operating the running service: the maintenance commands, `upgrade`, `config set`,
`scale`, `package`, `packages`, `deploy`, `walk`, `ops`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from rolehost.cli.common import (
    call,
    cli,
    connect,
    fail,
    file_option,
    offline,
    run_dir_option,
    slot_option,
)
from rolehost.client import Client
from rolehost.control.exits import EXIT_BAD_DEFINITION
from rolehost.fabric.disks import Maintenance, Upgrade
from rolehost.fabric.rundir import RunDir
from rolehost.limits import MAX_INSTANCES, MIN_INSTANCES

_MAINTENANCE_HELP = {
    Maintenance.RECYCLE: "Recycle: graceful stop, os/ and app/ kept, local resources emptied "
                         "if clean_on_recycle, startup tasks re-run.",
    Maintenance.RESTART: "Restart (reboot, host-OS update): graceful stop, app/ re-deployed, "
                         "os/ kept, startup tasks re-run.",
    Maintenance.REIMAGE: "Reimage (guest-OS update): graceful stop, os/ wiped, app/ re-deployed, "
                         "startup tasks re-run.",
    Maintenance.REBUILD: "Rebuild: graceful stop, every disk wiped, startup tasks re-run.",
    Maintenance.AGENT_UPDATE: "Agent update: only the host process restarts; no task re-runs, "
                              "no disk changes.",
}


def _maintenance_command(kind: Maintenance) -> click.Command:
    @click.argument("instances", nargs=-1, required=True)
    @file_option
    @run_dir_option
    @click.option("--wait", is_flag=True,
                  help="Return when every instance is ready again; exit 1 if one is not.")
    @slot_option
    def command(instances: tuple[str, ...], file: Path, run_dir: Path | None, wait: bool,
                slot: str) -> None:
        from rolehost.control import wording

        client = connect(file, run_dir, timeout=24 * 3600)
        for row in call(client.maintain, kind.value, list(instances), wait, None, slot):
            click.echo(wording.maintained(kind.value, row, wait))

    command.__doc__ = _MAINTENANCE_HELP[kind] + "\n\nINSTANCES are ROLE/INDEX or ROLE_IN_INDEX."
    return cli.command(name=kind.value)(command)


for _kind in _MAINTENANCE_HELP:
    _maintenance_command(_kind)


@cli.command()
@click.argument("kind", type=click.Choice([u.value for u in Upgrade]))
@file_option
@run_dir_option
@click.option("--manual", is_flag=True, help="Pause after each update domain walked, until "
              "`rolehost walk next`.")
@click.option("--detach", is_flag=True, help="Start the walk and return at once.")
@slot_option
def upgrade(kind: str, file: Path, run_dir: Path | None, manual: bool, detach: bool,
            slot: str) -> None:
    """Walk a platform update across the update domains, one at a time: host-os restarts,
    guest-os reimages, agent restarts only the host processes. A domain that does not
    come back halts the walk before the next one is touched."""
    from rolehost.control import wording

    client = connect(file, run_dir)
    walk = call(client.upgrade, kind, manual, slot)
    click.echo(wording.walk_header(walk, f"upgrade {kind}"))
    if not detach:
        _follow(client)


@cli.group()
def config() -> None:
    """Change a role's settings while it runs."""


@config.command(name="set")
@click.argument("role")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@file_option
@run_dir_option
@slot_option
def config_set(role: str, assignments: tuple[str, ...], file: Path, run_dir: Path | None,
               slot: str) -> None:
    """Set settings of ROLE: per update domain (or all at once with change_mode = "blast"),
    `changing` handlers may cancel, which recycles that instance to apply them. A domain
    that does not come back halts the change (exit 1): later domains keep their settings.
    VALUE is read as an integer, a number, true or false when it is one (as TOML writes
    them), and as a string otherwise."""
    from rolehost.definition.scalars import setting_from_text

    settings = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            fail(f"not KEY=VALUE: {assignment!r}", EXIT_BAD_DEFINITION)
        settings[key] = setting_from_text(value)
    outcome = call(connect(file, run_dir, timeout=24 * 3600).configure, role, settings, slot)
    for instance, what in outcome.items():
        click.echo(f"{instance}: {what}")


@cli.command()
@click.argument("role")
@click.argument("count", type=click.IntRange(MIN_INSTANCES, MAX_INSTANCES))
@file_option
@run_dir_option
@slot_option
def scale(role: str, count: int, file: Path, run_dir: Path | None, slot: str) -> None:
    """Run COUNT instances of ROLE: new ones get the next indexes (and UDs by the same
    rule); scaling in stops the highest indexes gracefully. The others are told per update
    domain, like a settings change: a domain that does not come back halts it (exit 1).
    Waits until the new instances are ready: exit 1 if one fails (its ready deadline).
    Prints the instances it added, or those it removed."""
    from rolehost.control import wording

    changed = call(connect(file, run_dir, timeout=24 * 3600).scale, role, count, slot)
    click.echo(wording.scaled(role, count, changed))


@cli.command()
@file_option
@run_dir_option
@click.option("--version", "version",
              help="Name the version: up to 64 letters, digits, . _ -, beginning with a "
                   "letter or a digit [default: a content hash].")
def package(file: Path, run_dir: Path | None, version: str | None) -> None:
    """Snapshot the definition (-f: a copy of the service's, say, whose settings differ)
    and each role's app folder as a version to deploy."""
    from rolehost.control import wording

    info = call(connect(file, run_dir).package, version, file)
    click.echo(wording.packaged(info))


@cli.command()
@file_option
@run_dir_option
def packages(file: Path, run_dir: Path | None) -> None:
    """List the versions in the package store, and the one running. With no controller
    running, they are read from the run directory."""
    from rolehost.fabric.packages import Packages
    from rolehost.observability.times import clock, iso

    where = RunDir.for_definition(file, run_dir)
    client = Client(where.socket)
    running, listed = offline(lambda: (client.status()["version"], client.packages()),
                               where.path / "packages",
                               lambda store: (None, Packages(store, where.path).list()))
    for info in listed:
        mark = "  (running)" if info["version"] == running else ""
        click.echo(f"{info['version']:<16} {clock(iso(info['created']))}  "
                   f"{', '.join(info['roles'])}{mark}")


@cli.command()
@click.argument("version")
@file_option
@run_dir_option
@click.option("--rollback/--no-rollback", default=True, show_default=True,
              help="If a domain fails, put the instances already moved back on the running "
                   "version (or leave them for inspection).")
@click.option("--manual", is_flag=True, help="Pause after each update domain walked, until "
              "`rolehost walk next`.")
@click.option("--detach", is_flag=True, help="Start the walk and return at once.")
@slot_option
def deploy(version: str, file: Path, run_dir: Path | None, rollback: bool, manual: bool,
           detach: bool, slot: str) -> None:
    """In-place upgrade to VERSION: a preflight (the package, its definition, its entry
    points) before any instance is touched, then a walk across the update domains. The
    package's instance counts are applied once every domain has moved. Exit 2 if the
    preflight refused it (no such package, not compatible, does not load): nothing was
    touched. Exit 1 if the walk failed or halted, or another operation is under way.

    With --slot staging: a whole second deployment of VERSION beside production, each
    input endpoint on its staging_port (docs/deploying.md); it returns once its instances
    are back. Exit 2 if refused (a staging deployment exists, a staging_port is missing
    or taken, the package does not load): nothing was touched."""
    from rolehost.control import wording
    from rolehost.fabric.slots import STAGING

    # A staging deploy answers once its instances are back, as a scale does.
    client = connect(file, run_dir, timeout=24 * 3600 if slot == STAGING else 120)
    if slot == STAGING:
        for line in wording.staged(call(client.deploy, version, rollback, manual, slot)):
            click.echo(line)
        return
    walk = call(client.deploy, version, rollback, manual)
    click.echo(wording.walk_header(walk, f"deploy {version}"))
    if not detach:
        _follow(client)


@cli.command()
@click.argument("action", required=False, type=click.Choice(["next", "abort"]))
@file_option
@run_dir_option
def walk(action: str | None, file: Path, run_dir: Path | None) -> None:
    """Show the walk, or act on it: `next` resumes a paused one, `abort` ends a paused or
    halted one."""
    client = connect(file, run_dir)
    snapshot = call(client.walk, action)
    if action == "next":  # the steps before it were shown by the command that paused
        _follow(client, snapshot["steps"][-1]["seq"] if snapshot["steps"] else 0)
    else:
        _print_walk(snapshot)


def _follow(client: Client, shown: int = 0) -> None:
    """Print each step of the walk after the `shown`-th, in order, until it ends, pauses
    or halts. The walk keeps every step: a poll that comes late prints them all the same,
    where printing the latest state of each instance lost the steps between two polls."""
    from rolehost.control import wording

    while True:
        snapshot = call(client.walk, None, shown)
        for step in snapshot["steps"]:
            click.echo(wording.walk_step(step))
            shown = step["seq"]
        end = wording.walk_end(snapshot)
        if end is not None:
            lines, failure = end
            for line in lines:
                click.echo(line)
            if failure:
                fail(failure)
            return
        time.sleep(0.2)


def _print_walk(snapshot: dict[str, Any]) -> None:
    from rolehost.control import wording

    for line in wording.walk_summary(snapshot):
        click.echo(line)


@cli.command()
@file_option
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON.")
def ops(file: Path, run_dir: Path | None, as_json: bool) -> None:
    """List the management operations of this run directory, across controller restarts.
    With no controller running, they are read from its history."""
    from rolehost.control import wording
    from rolehost.fabric.history import summary_without_controller

    where = RunDir.for_definition(file, run_dir)
    history = offline(Client(where.socket).operations, where.path / "history.jsonl",
                       summary_without_controller)
    if skipped := history.get("skipped_lines"):  # absent from an older controller's answer
        click.echo(f"rolehost: warning: {skipped} line(s) of {where.path / 'history.jsonl'} "
                   "are not an operation's and were skipped", err=True)
    if as_json:
        click.echo(json.dumps(history, indent=2, allow_nan=False))  # JSON, never Infinity
        return
    for op in history["operations"]:
        op_id, began, kind, outcome, seconds, instances, error = wording.operation_row(op)
        click.echo(f"{op_id}  {began}  {kind:<18} {outcome:<12} {seconds:>7}  "
                   f"{instances}{'  ' + error if error else ''}")
    click.echo(wording.success_rate(history))
