"""The `rolehost` command: parse, call the controller (or its API), print."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from rolehost import definition as model
from rolehost.client import ApiError, Client, ControllerNotRunning
from rolehost.control.exits import EXIT_BAD_DEFINITION, EXIT_FAILED, EXIT_STOP_CUT_SHORT, for_kind
from rolehost.definition.scalars import parse_address, parse_duration, setting_from_text
from rolehost.fabric import capacity, preflight
from rolehost.fabric.disks import Maintenance, Upgrade
from rolehost.fabric.names import instance_id, parse_instance_name
from rolehost.fabric.rundir import AlreadyRunning, RunDir, Unsuitable
from rolehost.observability import logs, output
from rolehost.observability.logs import iso
from rolehost.processes import privileges

DETACH_TIMEOUT = 60.0

_file = click.option(
    "-f", "--file", "file", type=click.Path(path_type=Path), default=Path("rolehost.toml"),
    show_default=True, help="The service definition.",
)
_run_dir = click.option(
    "--run-dir", type=click.Path(path_type=Path), envvar="ROLEHOST_RUN_DIR",
    help="Run directory [default: .rolehost/ beside the definition].",
)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"rolehost: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def _user_of(file: Path) -> Iterator[None]:
    """Exit 2 naming `file` when its `[service] limited_user` cannot run the hosts:
    decided only when a deployment is prepared, long after the definition was read."""
    try:
        yield
    except privileges.Unusable as exc:
        _fail(f"{file}: {exc}", EXIT_BAD_DEFINITION)


def _offline(ask: Callable[[], Any], kept: Path, read: Callable[[Path], Any]) -> Any:
    """The controller's answer, or, when none runs, what it would have read from `kept`
    in the run directory: what was recorded there outlives the controller."""
    def answer() -> Any:
        try:
            return ask()
        except ControllerNotRunning:
            if not kept.exists():
                raise
            return read(kept)

    return _call(answer)


def _client(file: Path, run_dir: Path | None, timeout: float = 30.0) -> Client:
    return Client(RunDir.for_definition(file, run_dir).socket, timeout=timeout)


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ControllerNotRunning as exc:
        _fail(str(exc))
    except ApiError as exc:
        _fail(str(exc), for_kind(exc.kind))


def _load(file: Path) -> model.Definition:
    """The validated definition, entry points included; exit 2 with every problem if not."""
    try:
        definition = model.load(file)
    except model.DefinitionErrors as exc:
        _fail(f"invalid definition:\n{exc}", EXIT_BAD_DEFINITION)
    errors = preflight.entry_points(definition, file)
    if errors:
        _fail(f"invalid definition:\n{model.DefinitionErrors(errors)}", EXIT_BAD_DEFINITION)
    return definition


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rolehost")
def cli() -> None:
    """Run Python roles with the lifecycle rules of Azure Cloud Services, and rehearse
    the platform's maintenance on them."""


@cli.command()
@_file
@_run_dir
@click.option("--detach", is_flag=True, help="Run the controller in the background.")
@click.option("--console/--no-console", default=True, show_default=True,
              help="Print events and instance output here (they are in the logs either way).")
def start(file: Path, run_dir: Path | None, detach: bool, console: bool) -> None:
    """Start the service and supervise it until stopped (Ctrl-C, SIGTERM, `rolehost stop`).
    A second Ctrl-C or SIGTERM stops it at once. Exit 0 once stopped, 3 if the stop was
    cut short (an instance's on_stop overran stop_timeout, or a second signal)."""
    definition = _load(file)
    where = RunDir.for_definition(file, run_dir)
    try:
        where.ensure()
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    if (holder := where.holder()) is not None:
        _fail(f"another controller (pid {holder}) is already running on {where.path}")
    if detach:
        _detach(file, where)
        return
    from rolehost.fabric.controller import Controller, StartError

    with _user_of(file):
        controller = Controller(definition, file.resolve(), where,
                                logs.Console() if console else None)
    try:
        from rolehost.processes.process import event_loop  # uvloop's when installed

        with asyncio.Runner(loop_factory=event_loop) as runner:
            runner.run(controller.serve())
    except (AlreadyRunning, StartError) as exc:
        _fail(str(exc))
    finally:
        if controller.console is not None:
            controller.console.flush()  # its last lines, "controller stopped" among them
    if controller.cut_short:
        _fail(_cut_short(controller.cut_short), EXIT_STOP_CUT_SHORT)


def _cut_short(instances: dict[str, str]) -> str:
    return "the stop was cut short; cleanup may be incomplete:\n" + "\n".join(
        f"  {name}: {why}" for name, why in instances.items())


def _detach(file: Path, where: RunDir) -> None:
    with open(where.console_log, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "rolehost", "start", "-f", str(file),
             "--run-dir", str(where.path), "--no-console"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    client = Client(where.socket, timeout=2.0)
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = "\n".join(logs.tail(where.console_log, 20))
            _fail(f"the controller exited with {child.returncode}:\n{tail}",
                  EXIT_BAD_DEFINITION if child.returncode == EXIT_BAD_DEFINITION else EXIT_FAILED)
        try:
            status = client.status()
        except (ControllerNotRunning, OSError):
            time.sleep(0.05)
            continue
        click.echo(f"started {status['service']} (controller pid {status['pid']}, "
                   f"run dir {status['run_dir']})")
        return
    child.kill()
    _fail(f"the controller did not answer within {DETACH_TIMEOUT:g}s")


@cli.command()
@_file
@_run_dir
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
def status(file: Path, run_dir: Path | None, as_json: bool) -> None:
    """Show every instance: state, process, restarts, last error."""
    result = _call(_client(file, run_dir).status)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['service']}  deployment {result['deployment_id'][:12]}  "
               f"controller pid {result['pid']}")
    rows = [("INSTANCE", "UD", "STATE", "PID", "RESTARTS", "SINCE", "DETAIL")]
    for i in result["instances"]:
        detail = i["reason"] if i["state"] != "ready" else i.get("why_not_back") or ""
        if i["last_error"] and i["state"] == "failed":
            detail = i["last_error"]
        if i["next_try"]:
            detail = detail.partition("; next try in")[0]
            detail += f" (next try {logs.clock(i['next_try'])})"
        since = logs.clock(i["state_since"])
        rows.append((i["id"], str(i["update_domain"]), i["state"], str(i["pid"] or "-"),
                     str(i["restarts"]), since, detail))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    for advice in result["capacity"]:
        click.echo(f"capacity: {advice}")
    for row in rows:
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[6]
        click.echo(line.rstrip())


@cli.command(name="status-check")
@click.argument("instances", nargs=-1, required=True)
@_file
@_run_dir
def status_check(instances: tuple[str, ...], file: Path, run_dir: Path | None) -> None:
    """Have INSTANCES run their status checks now rather than at the next interval."""
    client = _client(file, run_dir)
    for name in instances:
        _call(client.check_status, name)
        click.echo(f"{name}: status check requested")


@cli.command()
@_file
@_run_dir
def stop(file: Path, run_dir: Path | None) -> None:
    """Stop every instance gracefully and end the controller. Exit 0 once stopped, 3 if
    the stop was cut short (an instance's on_stop overran stop_timeout, or the controller
    got a second signal meanwhile)."""
    where = RunDir.for_definition(file, run_dir)
    answer = _call(Client(where.socket, timeout=24 * 3600).shutdown)
    # The controller releases the run directory's lock as its last act.
    deadline = time.monotonic() + 30
    while (pid := where.holder()) is not None:
        if time.monotonic() > deadline:
            _fail(f"instances stopped, but the controller (pid {pid}) did not exit")
        time.sleep(0.02)
    click.echo("stopped")
    if cut_short := answer.get("cut_short"):  # absent from an older controller's answer
        _fail(_cut_short(cut_short), EXIT_STOP_CUT_SHORT)


@cli.command(name="logs")
@click.argument("instance", required=False)
@click.option(
    "--file", "file", type=click.Path(path_type=Path), default=Path("rolehost.toml"),
    show_default=True, help="The service definition (-f is --follow here, as in tail).",
)
@_run_dir
@click.option("-n", "--lines", default=50, show_default=True, help="Lines of history to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
def logs_command(
    instance: str | None, file: Path, run_dir: Path | None, lines: int, follow: bool
) -> None:
    """Show an instance's output, or the controller's event log without INSTANCE."""
    where = RunDir.for_definition(file, run_dir)
    if instance is None:
        path, render = where.logs / "controller.log", logs.render_event
    else:
        try:
            role, index = parse_instance_name(instance)
        except ValueError as exc:
            _fail(str(exc), EXIT_BAD_DEFINITION)
        path, render = where.instance_log(instance_id(role, index)), output.render
    if not path.exists():
        _fail(f"no log {path.name} in {where.logs} (has the service been started?)",
              EXIT_BAD_DEFINITION)
    for line in logs.tail(path, lines):
        click.echo(render(line))
    if follow:
        with contextlib.suppress(KeyboardInterrupt):
            logs.follow(path, lambda line: click.echo(render(line)))


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
    @_file
    @_run_dir
    @click.option("--wait", is_flag=True,
                  help="Return when every instance is ready again; exit 1 if one is not.")
    def command(instances: tuple[str, ...], file: Path, run_dir: Path | None, wait: bool) -> None:
        client = _client(file, run_dir, timeout=24 * 3600)
        for row in _call(client.maintain, kind.value, list(instances), wait):
            done = row["state"] if wait else f"{kind.value} begun"
            click.echo(f"{row['id']}: {done}")

    command.__doc__ = _MAINTENANCE_HELP[kind] + "\n\nINSTANCES are ROLE/INDEX or ROLE_IN_INDEX."
    return cli.command(name=kind.value)(command)


for _kind in _MAINTENANCE_HELP:
    _maintenance_command(_kind)


@cli.command()
@click.argument("kind", type=click.Choice([u.value for u in Upgrade]))
@_file
@_run_dir
@click.option("--manual", is_flag=True, help="Pause after each update domain walked, until "
              "`rolehost walk next`.")
@click.option("--detach", is_flag=True, help="Start the walk and return at once.")
def upgrade(kind: str, file: Path, run_dir: Path | None, manual: bool, detach: bool) -> None:
    """Walk a platform update across the update domains, one at a time: host-os restarts,
    guest-os reimages, agent restarts only the host processes. A domain that does not
    come back halts the walk before the next one is touched."""
    client = _client(file, run_dir)
    walk = _call(client.upgrade, kind, manual)
    click.echo(walk_header(walk, f"upgrade {kind}"))
    if not detach:
        _follow(client)


@cli.group()
def config() -> None:
    """Change a role's settings while it runs."""


@config.command(name="set")
@click.argument("role")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@_file
@_run_dir
def config_set(role: str, assignments: tuple[str, ...], file: Path, run_dir: Path | None) -> None:
    """Set settings of ROLE: per update domain (or all at once with change_mode = "blast"),
    `changing` handlers may cancel, which recycles that instance to apply them. A domain
    that does not come back halts the change (exit 1): later domains keep their settings.
    VALUE is read as an integer, a number, true or false when it is one (as TOML writes
    them), and as a string otherwise."""
    settings = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            _fail(f"not KEY=VALUE: {assignment!r}", EXIT_BAD_DEFINITION)
        settings[key] = setting_from_text(value)
    outcome = _call(_client(file, run_dir, timeout=24 * 3600).configure, role, settings)
    for instance, what in outcome.items():
        click.echo(f"{instance}: {what}")


@cli.command()
@click.argument("role")
@click.argument("count", type=click.IntRange(model.MIN_INSTANCES, model.MAX_INSTANCES))
@_file
@_run_dir
def scale(role: str, count: int, file: Path, run_dir: Path | None) -> None:
    """Run COUNT instances of ROLE: new ones get the next indexes (and UDs by the same
    rule); scaling in stops the highest indexes gracefully. The others are told per update
    domain, like a settings change: a domain that does not come back halts it (exit 1).
    Waits until the new instances are ready: exit 1 if one fails (its ready deadline).
    Prints the instances it added, or those it removed."""
    changed = _call(_client(file, run_dir, timeout=24 * 3600).scale, role, count)
    click.echo(scaled(role, count, changed))


def scaled(role: str, count: int, changed: list[str]) -> str:
    """What a scale to `count` did, from the instances it names: a role's instances are
    always indexes 0 to count - 1, so those at `count` or above were removed, the others
    added (a scale does one or the other)."""
    removed = [name for name in changed if parse_instance_name(name)[1] >= count]
    added = [name for name in changed if name not in removed]
    what = (f"added {', '.join(added)}" if added else f"removed {', '.join(removed)}"
            if removed else "unchanged")
    return f"{role}: {count} instance{'s' if count > 1 else ''}, {what}"


@cli.command()
@_file
@_run_dir
@click.option("--version", "version", help="Name the version [default: a content hash].")
def package(file: Path, run_dir: Path | None, version: str | None) -> None:
    """Snapshot the definition and each role's app folder as a version to deploy."""
    info = _call(_client(file, run_dir).package, version)
    click.echo(f"package {info['version']}: roles {', '.join(info['roles'])}")


@cli.command()
@_file
@_run_dir
def packages(file: Path, run_dir: Path | None) -> None:
    """List the versions in the package store, and the one running. With no controller
    running, they are read from the run directory."""
    from rolehost.fabric.packages import Packages

    where = RunDir.for_definition(file, run_dir)
    client = Client(where.socket)
    running, listed = _offline(lambda: (client.status()["version"], client.packages()),
                               where.path / "packages",
                               lambda store: (None, Packages(store, where.path).list()))
    for info in listed:
        mark = "  (running)" if info["version"] == running else ""
        click.echo(f"{info['version']:<16} {logs.clock(iso(info['created']))}  "
                   f"{', '.join(info['roles'])}{mark}")


@cli.command()
@click.argument("version")
@_file
@_run_dir
@click.option("--rollback/--no-rollback", default=True, show_default=True,
              help="If a domain fails, put the instances already moved back on the running "
                   "version (or leave them for inspection).")
@click.option("--manual", is_flag=True, help="Pause after each update domain walked, until "
              "`rolehost walk next`.")
@click.option("--detach", is_flag=True, help="Start the walk and return at once.")
def deploy(version: str, file: Path, run_dir: Path | None, rollback: bool, manual: bool,
           detach: bool) -> None:
    """In-place upgrade to VERSION: a preflight (the package, its definition, its entry
    points) before any instance is touched, then a walk across the update domains. The
    package's instance counts are applied once every domain has moved. Exit 2 if the
    preflight refused it (no such package, not compatible, does not load): nothing was
    touched. Exit 1 if the walk failed or halted, or another operation is under way."""
    client = _client(file, run_dir, timeout=120)
    walk = _call(client.deploy, version, rollback, manual)
    click.echo(walk_header(walk, f"deploy {version}"))
    if not detach:
        _follow(client)


@cli.command()
@click.argument("action", required=False, type=click.Choice(["next", "abort"]))
@_file
@_run_dir
def walk(action: str | None, file: Path, run_dir: Path | None) -> None:
    """Show the walk, or act on it: `next` resumes a paused one, `abort` ends a paused or
    halted one."""
    client = _client(file, run_dir)
    snapshot = _call(client.walk, action)
    if action == "next":  # the steps before it were shown by the command that paused
        _follow(client, snapshot["steps"][-1]["seq"] if snapshot["steps"] else 0)
    else:
        _print_walk(snapshot)


def walk_header(walk: dict[str, Any], what: str) -> str:
    """The walk's first line. It counts the domains it walks: those with no instance (a
    role of 2 instances over 5 domains leaves 3 empty) are skipped."""
    walked = sum(1 for instances in walk["domains"] if instances)
    return f"walk {walk['id']}: {what} over {walked} update domain{'s' if walked != 1 else ''}"


def _follow(client: Client, shown: int = 0) -> None:
    """Print each step of the walk after the `shown`-th, in order, until it ends, pauses
    or halts. The walk keeps every step: a poll that comes late prints them all the same,
    where printing the latest state of each instance lost the steps between two polls."""
    while True:
        snapshot = _call(client.walk, None, shown)
        for step in snapshot["steps"]:
            click.echo(f"  UD {step['domain']}  {step['instance']:<16} {step['step']}")
            shown = step["seq"]
        state = snapshot["state"]
        if state == "succeeded":
            click.echo(f"walk {snapshot['id']}: every update domain done "
                       f"in {snapshot['seconds']:.1f}s")
            if snapshot["error"]:  # what came after the last domain (a deploy's scale)
                _fail(f"walk {snapshot['id']}: {snapshot['error']}")
            return
        if state == "paused":
            click.echo(f"walk {snapshot['id']}: paused after update domain "
                       f"{snapshot['domain']}; `rolehost walk next` to go on")
            return
        if state in ("halted", "aborted", "rolled back"):
            _fail(f"walk {snapshot['id']} {state}: {snapshot['error'] or 'aborted'}"
                  + ("\n`rolehost walk abort` ends it" if state == "halted" else ""))
        time.sleep(0.2)


def _print_walk(snapshot: dict[str, Any]) -> None:
    click.echo(f"walk {snapshot['id']}: {snapshot['label']} ({snapshot['mode']}), "
               f"{snapshot['state']}, update domain {snapshot['domain']}")
    for ud, instances in enumerate(snapshot["domains"]):
        for instance in instances:
            click.echo(f"  UD {ud}  {instance:<16} {snapshot['progress'][instance]}")
    if snapshot["error"]:
        click.echo(f"  error: {snapshot['error']}")


@cli.command()
@_file
@_run_dir
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON.")
def ops(file: Path, run_dir: Path | None, as_json: bool) -> None:
    """List the management operations of this run directory, across controller restarts.
    With no controller running, they are read from its history."""
    from rolehost.fabric.history import summary_without_controller

    where = RunDir.for_definition(file, run_dir)
    history = _offline(Client(where.socket).operations, where.path / "history.jsonl",
                       summary_without_controller)
    if as_json:
        click.echo(json.dumps(history, indent=2))
        return
    for op in history["operations"]:
        began = logs.clock(iso(op["started"]))
        seconds = f"{op['ended'] - op['started']:.1f}s" if op["ended"] else "-"
        error = f"  {op['error'].splitlines()[0]}" if op["error"] else ""
        click.echo(f"{op['id']}  {began}  {op['kind']:<18} {op['outcome']:<12} {seconds:>7}  "
                   f"{','.join(op['instances'])}{error}")
    rate = history["success_rate"]
    click.echo("success rate: " + ("-" if rate is None else f"{rate:.0%}"))


@cli.command()
@click.argument("roles", nargs=-1)
@_file
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(roles: tuple[str, ...], file: Path, as_json: bool) -> None:
    """Validate a definition, then rehearse: boot one instance of each role (or of ROLES)
    in a scratch run directory and take it through start, restart, reimage, rebuild and
    restart, requiring it ready after each. Exit 0 only when every step passed."""
    from rolehost.fabric import rehearsal

    definition = _load(file)
    unknown = [r for r in roles if r not in definition.roles]
    if unknown:
        _fail(f"no role {', '.join(unknown)} in {file} (roles: {', '.join(definition.roles)})",
              EXIT_BAD_DEFINITION)
    advice = capacity.static_advice(definition)
    if not as_json:
        click.echo(f"{file}: valid; rehearsing {', '.join(roles or definition.roles)}")
        click.echo("\n".join(f"capacity: {line}" for line in advice))
    with _user_of(file):
        report = asyncio.run(rehearsal.rehearse(definition, list(roles) or None))
    if as_json:
        click.echo(json.dumps({**report.to_json(), "capacity": advice}, indent=2))
    else:
        click.echo(rehearsal.render(report))
    sys.exit(0 if report.ok else EXIT_FAILED)


def _address(_: click.Context, __: click.Parameter, value: str) -> tuple[str, int]:
    """HOST:PORT, the host named: nothing listens on every interface unless asked."""
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _duration(_: click.Context, __: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command(name="run-instance")
@click.argument("role")
@_file
@_run_dir
@click.option("--index", type=click.IntRange(min=0),
              help="The instance's index [default: ROLEHOST_INDEX, or the ordinal at the "
                   "end of the host name (a StatefulSet pod), or 0].")
@click.option("--health", default="127.0.0.1:8484", show_default=True, callback=_address,
              help="host:port of /startup, /ready, /live and /stop (0.0.0.0:PORT to listen "
                   "on every interface, [::1]:PORT for IPv6).")
@click.option("--drain-delay", default="0", show_default=True, callback=_duration,
              help="Time between leaving rotation (/ready 503) and the stop: seconds, or "
                   "a duration such as 500ms or 5s.")
@click.option("--endpoint-host", help="Address the role binds its endpoints on [default: "
              "each endpoint's host]; 0.0.0.0 in a container.")
@click.option("--resources-dir", type=click.Path(path_type=Path),
              help="Folder of the local resources (a persistent volume) [default: in the "
                   "run directory].")
def run_instance(role: str, file: Path, run_dir: Path | None, index: int | None,
                 health: tuple[str, int],
                 drain_delay: float, endpoint_host: str | None,
                 resources_dir: Path | None) -> None:
    """Run one instance of ROLE in the foreground, as a container would: startup tasks,
    the host and the lifecycle rules, no balancer, and health endpoints for the platform
    in front. SIGTERM or /stop stops it gracefully; a second SIGTERM or Ctrl-C stops it at
    once. Exit 0 once stopped, 3 if the stop was cut short (on_stop overran stop_timeout,
    or a second signal)."""
    from rolehost.fabric import single

    definition = _load(file)
    if role not in definition.roles:
        _fail(f"no role {role!r} in {file} (roles: {', '.join(definition.roles)})",
              EXIT_BAD_DEFINITION)
    try:
        chosen = single.index_from_environment() if index is None else index
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_DEFINITION)
    try:
        with _user_of(file):
            code = single.run(definition, file, role, chosen, health, run_dir, drain_delay,
                              endpoint_host, resources_dir)
    except (AlreadyRunning, Unsuitable, single.CannotListen) as exc:
        _fail(str(exc))
    except model.DefinitionError as exc:  # a setting from the environment, of the wrong type
        _fail(str(model.DefinitionError(file, exc.path, exc.message)), EXIT_BAD_DEFINITION)
    sys.exit(code)


@cli.group()
def export() -> None:
    """Write files that run the service under another process manager."""


@export.command(name="systemd")
@_file
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Folder to write rolehost-NAME.service into.")
def export_systemd(file: Path, output: Path) -> None:
    """A systemd unit running `rolehost start` with Type=notify: READY once every role has
    a ready instance, STATUS with the counts, a watchdog, SIGTERM for a graceful stop."""
    from rolehost.export import systemd

    definition = _load(file)
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"rolehost-{definition.service.name}.service"
    target.write_text(systemd.unit(definition, file))
    click.echo(f"wrote {target}")


@export.command(name="kubernetes")
@_file
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Folder to write SERVICE-ROLE.yaml (and "
              "SERVICE-ROLE-secret.yaml) into.")
@click.option("--image", help="Container image with the apps, rolehost, python3 and the "
              "definition at /app/rolehost.toml [default: SERVICE:latest].")
def export_kubernetes(file: Path, output: Path, image: str | None) -> None:
    """Manifests per role: a Deployment (a StatefulSet for persistent local resources)
    running `rolehost run-instance`, probes, a preStop drain, a rolling update and a
    PodDisruptionBudget of one update domain, a Service per endpoint, a ConfigMap and
    a Secret for the settings."""
    from rolehost.export import kubernetes

    definition = _load(file)
    try:
        written = kubernetes.write(definition, output, image)
    except model.DefinitionError as exc:
        _fail(f"cannot export to Kubernetes:\n{model.DefinitionError(file, exc.path, exc.message)}",
              EXIT_BAD_DEFINITION)
    except OSError as exc:
        _fail(f"cannot write the manifests: {exc}")
    for target in written:
        click.echo(f"wrote {target}")


@cli.command()
def schema() -> None:
    """Print the JSON schema of rolehost.toml (for editors and validators)."""
    click.echo(json.dumps(model.json_schema(), indent=2))


def main() -> None:
    cli(prog_name="rolehost")
