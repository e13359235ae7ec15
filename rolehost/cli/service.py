"""Running the service: `start`, `stop`, `status`, `status-check`, `logs`."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import click

from rolehost.cli.common import (
    DETACH_TIMEOUT,
    call,
    cli,
    connect,
    fail,
    file_option,
    load_checked,
    run_dir_option,
    slot_option,
    user_of,
)
from rolehost.client import ApiError, Client, ControllerNotRunning
from rolehost.control.exits import (
    EXIT_BAD_DEFINITION,
    EXIT_FAILED,
    EXIT_STOP_CUT_SHORT,
    for_kind,
)
from rolehost.fabric.names import instance_id, parse_instance_name
from rolehost.fabric.rundir import AlreadyRunning, RunDir


@cli.command()
@file_option
@run_dir_option
@click.option("--detach", is_flag=True, help="Run the controller in the background.")
@click.option("--console/--no-console", default=True, show_default=True,
              help="Print events and instance output here (they are in the logs either way).")
def start(file: Path, run_dir: Path | None, detach: bool, console: bool) -> None:
    """Start the service and supervise it until stopped (Ctrl-C, SIGTERM, `rolehost stop`).
    A second Ctrl-C or SIGTERM stops it at once. Exit 0 once stopped, 3 if the stop was
    cut short (an instance's on_stop overran stop_timeout, or a second signal)."""
    import asyncio

    from rolehost.observability import logs

    definition = load_checked(file, controller=True)
    where = RunDir.for_definition(file, run_dir)
    try:
        where.ensure()
    except (OSError, ValueError) as exc:
        fail(str(exc))
    if (holder := where.holder()) is not None:
        fail(f"another controller (pid {holder}) is already running on {where.path}")
    if detach:
        _detach(file, where)
        return
    from rolehost.fabric.controller import Controller, StartError

    with user_of(file):
        controller = Controller(definition, file.resolve(), where,
                                logs.Console() if console else None)
    try:
        from rolehost.processes.process import event_loop  # uvloop's when installed

        with asyncio.Runner(loop_factory=event_loop) as runner:
            runner.run(controller.serve())
    except (AlreadyRunning, StartError) as exc:
        fail(str(exc))
    finally:
        if controller.console is not None:
            controller.console.flush()  # its last lines, "controller stopped" among them
    if controller.cut_short:
        fail(_cut_short(controller.cut_short), EXIT_STOP_CUT_SHORT)


def _cut_short(instances: dict[str, str]) -> str:
    return "the stop was cut short; cleanup may be incomplete:\n" + "\n".join(
        f"  {name}: {why}" for name, why in instances.items())


def _detach(file: Path, where: RunDir) -> None:
    from rolehost.observability import logs

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
            # Another start won the run directory between the check above and the
            # child's lock: its controller answers on the socket, not this one.
            if (holder := where.holder()) is not None and holder != child.pid:
                fail(f"another controller (pid {holder}) is already running on {where.path}")
            tail = "\n".join(logs.tail(where.console_log, 20))
            fail(f"the controller exited with {child.returncode}:\n{tail}",
                  EXIT_BAD_DEFINITION if child.returncode == EXIT_BAD_DEFINITION else EXIT_FAILED)
        try:
            status = client.status()
        except (ControllerNotRunning, OSError):
            status = None
        if status is None or status["pid"] != child.pid:  # none yet, or another's
            time.sleep(0.05)
            continue
        click.echo(f"started {status['service']} (controller pid {status['pid']}, "
                   f"run dir {status['run_dir']})")
        return
    child.kill()
    fail(f"the controller did not answer within {DETACH_TIMEOUT:g}s")


@cli.command()
@file_option
@run_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the full status as JSON.")
@slot_option
def status(file: Path, run_dir: Path | None, as_json: bool, slot: str) -> None:
    """Show every instance of a slot's deployment: state, process, memory, restarts, last
    error."""
    result = call(connect(file, run_dir).status, slot)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rolehost.control import wording
    from rolehost.observability import times

    click.echo(f"{result['service']}  deployment {result['deployment_id'][:12]}  "
               f"controller pid {result['pid']}")
    for line in wording.slots(result):
        click.echo(line)
    rows = [("INSTANCE", "UD", "STATE", "PID", "MEMORY", "RESTARTS", "SINCE", "DETAIL")]
    for i in result["instances"]:
        detail = wording.instance_detail(i)
        since = times.clock(i["state_since"])
        memory = i.get("memory_bytes")
        rows.append((i["id"], str(i["update_domain"]), i["state"], str(i["pid"] or "-"),
                     f"{memory / 2**20:.0f}MB" if memory is not None else "-",
                     str(i["restarts"]), since, detail))
    widths = [max(len(r[c]) for r in rows) for c in range(7)]
    for advice in result["capacity"]:
        click.echo(f"capacity: {advice}")
    for row in rows:
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[7]
        click.echo(line.rstrip())
    # Input endpoints have their balancer's public port; the others are where each
    # instance listens itself, which is what one needs to reach it.
    direct = [(i["id"], name, ep) for i in result["instances"]
              for name, ep in i["endpoints"].items() if ep.get("kind", "input") != "input"]
    if direct:
        click.echo("\nENDPOINTS (internal and instance, where each instance listens)")
        width = max(len(f"{i}.{n}") for i, n, _ in direct)
        for instance, name, ep in direct:
            click.echo(f"{f'{instance}.{name}'.ljust(width)}  {ep['kind']:<8}  "
                       f"{ep['protocol']:<4}  {ep['host']}:{ep['port']}")


@cli.command(name="status-check")
@click.argument("instances", nargs=-1, required=True)
@file_option
@run_dir_option
def status_check(instances: tuple[str, ...], file: Path, run_dir: Path | None) -> None:
    """Have INSTANCES run their status checks now rather than at the next interval."""
    client = connect(file, run_dir)
    for name in instances:
        call(client.check_status, name)
        click.echo(f"{name}: status check requested")


@cli.command()
@file_option
@run_dir_option
def stop(file: Path, run_dir: Path | None) -> None:
    """Stop every instance gracefully and end the controller. Exit 0 once stopped, 3 if
    the stop was cut short (an instance's on_stop overran stop_timeout, or the controller
    got a second signal meanwhile)."""
    where = RunDir.for_definition(file, run_dir)
    answer = call(Client(where.socket, timeout=24 * 3600).shutdown)
    # The controller releases the run directory's lock as its last act.
    deadline = time.monotonic() + 30
    while (pid := where.holder()) is not None:
        if time.monotonic() > deadline:
            fail(f"instances stopped, but the controller (pid {pid}) did not exit")
        time.sleep(0.02)
    click.echo("stopped")
    if cut_short := answer.get("cut_short"):  # absent from an older controller's answer
        fail(_cut_short(cut_short), EXIT_STOP_CUT_SHORT)


@cli.command(name="logs")
@click.argument("instance", required=False)
@click.option(
    "--file", "file", type=click.Path(path_type=Path), default=Path("rolehost.toml"),
    show_default=True, help="The service definition (-f is --follow here, as in tail).",
)
@run_dir_option
@click.option("-n", "--lines", default=50, show_default=True, help="Lines of history to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@slot_option
def logs_command(
    instance: str | None, file: Path, run_dir: Path | None, lines: int, follow: bool,
    slot: str,
) -> None:
    """Show an instance's output, or the controller's event log without INSTANCE. With no
    controller running, production's log in the run directory."""
    from rolehost.observability import logs, output

    where = RunDir.for_definition(file, run_dir)
    if instance is None:
        path, render = where.logs / "controller.log", logs.render_event
    else:
        try:
            role, index = parse_instance_name(instance)
        except ValueError as exc:
            fail(str(exc), EXIT_BAD_DEFINITION)
        path, render = where.instance_log(instance_id(role, index)), output.render
        # Where the deployment in the slot keeps it (a staging one, or one swapped into
        # production, keeps its logs in its own folder: docs/deploying.md).
        # Production's instances that are gone (scaled in) keep theirs in the run directory.
        try:
            path = Path(Client(where.socket).instance(instance, slot)["log"])
        except ControllerNotRunning:
            if slot != "production":
                fail(f"no controller is running: no {slot} deployment", EXIT_BAD_DEFINITION)
        except ApiError as exc:
            if slot != "production":
                fail(exc.message, for_kind(exc.kind))
    if not path.exists():
        fail(f"no log {path.name} in {where.logs} (has the service been started?)",
              EXIT_BAD_DEFINITION)
    for line in logs.tail(path, lines):
        click.echo(render(line))
    if follow:
        with contextlib.suppress(KeyboardInterrupt):
            logs.follow(path, lambda line: click.echo(render(line)))
