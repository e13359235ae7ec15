"""Working without a running controller: `init`, `check`, `run-instance`, `export`,
`schema`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rolehost.cli.common import (
    cli,
    fail,
    file_option,
    load_checked,
    run_dir_option,
    user_of,
)
from rolehost.control.exits import EXIT_BAD_DEFINITION, EXIT_FAILED
from rolehost.limits import MAX_INSTANCES


@cli.command()
@click.argument("folder", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--role", type=click.Choice(["worker", "web"]), default="worker",
              show_default=True, help="A worker role, or a web role with a site.")
@click.option("--site", type=click.Choice(["asgi", "wsgi"]), default="asgi",
              show_default=True, help="The web role's application: ASGI or WSGI.")
def init(folder: Path, role: str, site: str) -> None:
    """Write a new service into FOLDER (default: here): rolehost.toml with comments, a
    role module, and a pytest file that rehearses a restart and a reimage. It passes
    `rolehost check`, and `rolehost start` runs it. Existing files are never overwritten:
    if one is there, nothing is written."""
    from rolehost import scaffold

    try:
        written = scaffold.init(folder, role, site)
    except (scaffold.ScaffoldError, OSError) as exc:
        fail(str(exc), EXIT_FAILED)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: cd {folder} && rolehost check && pytest && rolehost start")


@cli.command()
@click.argument("roles", nargs=-1)
@file_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(roles: tuple[str, ...], file: Path, as_json: bool) -> None:
    """Validate a definition, then rehearse: boot one instance of each role (or of ROLES)
    in a scratch run directory and take it through start, restart, reimage, rebuild and
    restart, requiring it ready after each. Exit 0 only when every step passed."""
    import asyncio

    from rolehost.fabric import capacity, rehearsal

    definition = load_checked(file, controller=True)
    unknown = [r for r in roles if r not in definition.roles]
    if unknown:
        fail(f"no role {', '.join(unknown)} in {file} (roles: {', '.join(definition.roles)})",
              EXIT_BAD_DEFINITION)
    advice = capacity.static_advice(definition)
    if not as_json:
        click.echo(f"{file}: valid; rehearsing {', '.join(roles or definition.roles)}")
        click.echo("\n".join(f"capacity: {line}" for line in advice))
    with user_of(file):
        report = asyncio.run(rehearsal.rehearse(definition, list(roles) or None))
    if as_json:
        click.echo(json.dumps({**report.to_json(), "capacity": advice}, indent=2))
    else:
        click.echo(rehearsal.render(report))
    sys.exit(0 if report.ok else EXIT_FAILED)


def _address(_: click.Context, __: click.Parameter, value: str) -> tuple[str, int]:
    """HOST:PORT, the host named: nothing listens on every interface unless asked."""
    from rolehost.definition.scalars import parse_address

    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _duration(_: click.Context, __: click.Parameter, value: str) -> float:
    from rolehost.definition.scalars import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command(name="run-instance")
@click.argument("role")
@file_option
@run_dir_option
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
    from rolehost import definition as model
    from rolehost.fabric import single
    from rolehost.fabric.rundir import AlreadyRunning, Unsuitable

    definition = load_checked(file)
    if role not in definition.roles:
        fail(f"no role {role!r} in {file} (roles: {', '.join(definition.roles)})",
              EXIT_BAD_DEFINITION)
    try:
        chosen = single.index_from_environment() if index is None else index
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_DEFINITION)
    try:
        with user_of(file):
            code = single.run(definition, file, role, chosen, health, run_dir, drain_delay,
                              endpoint_host, resources_dir)
    except (AlreadyRunning, Unsuitable, single.CannotListen) as exc:
        fail(str(exc))
    except model.DefinitionError as exc:  # a setting from the environment, of the wrong type
        fail(str(model.DefinitionError(file, exc.path, exc.message)), EXIT_BAD_DEFINITION)
    sys.exit(code)


@cli.group()
def export() -> None:
    """Write files that run the service under another process manager."""


@export.command(name="systemd")
@file_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Folder to write rolehost-NAME.service into.")
def export_systemd(file: Path, output: Path) -> None:
    """A systemd unit running `rolehost start` with Type=notify: READY once every role has
    a ready instance, STATUS with the counts, a watchdog, SIGTERM for a graceful stop."""
    from rolehost.export import systemd

    definition = load_checked(file)
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"rolehost-{definition.service.name}.service"
    target.write_text(systemd.unit(definition, file))
    click.echo(f"wrote {target}")


@export.command(name="kubernetes")
@file_option
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
    from rolehost import definition as model
    from rolehost.export import kubernetes

    definition = load_checked(file)
    try:
        written = kubernetes.write(definition, output, image)
    except model.DefinitionError as exc:
        fail(f"cannot export to Kubernetes:\n{model.DefinitionError(file, exc.path, exc.message)}",
              EXIT_BAD_DEFINITION)
    except OSError as exc:
        fail(f"cannot write the manifests: {exc}")
    for target in written:
        click.echo(f"wrote {target}")


@export.command(name="haproxy")
@file_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Folder to write haproxy.cfg into.")
@click.option("--slots", type=click.IntRange(0, MAX_INSTANCES), default=0,
              help="Servers per endpoint, if more than the role's instances: a scale-out "
              "within them needs no reload.")
@click.option("--socket", type=click.Path(path_type=Path),
              help="Serve HAProxy's runtime API on this Unix socket (mode 0600).")
def export_haproxy(file: Path, output: Path, slots: int, socket: Path | None) -> None:
    """A haproxy.cfg in front of the external endpoints (balancer = "external"): each
    endpoint's port, every instance's private port with an agent-check on its readiness
    port, retries of refused connections elsewhere, a queue while none is ready."""
    from rolehost.export import haproxy

    definition = load_checked(file)
    if not haproxy.external(definition):
        fail(f"{file}: no endpoint has balancer = \"external\": nothing for HAProxy to "
             "balance", EXIT_BAD_DEFINITION)
    try:
        target = haproxy.write(definition, output, slots, socket)
    except OSError as exc:
        fail(f"cannot write haproxy.cfg: {exc}")
    click.echo(f"wrote {target}")


@cli.command()
def schema() -> None:
    """Print the JSON schema of rolehost.toml (for editors and validators)."""
    from rolehost import definition as model

    click.echo(json.dumps(model.json_schema(), indent=2))
