"""`rolehost portal`: the web page to watch and operate the service (rolehost/portal)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import click

from rolehost.cli.common import cli, fail, file_option, run_dir_option
from rolehost.control.exits import EXIT_BAD_DEFINITION
from rolehost.fabric.rundir import RunDir

DEFAULT_LISTEN = "127.0.0.1:8484"


@cli.command()
@file_option
@run_dir_option
@click.option("--listen", help="HOST:PORT to serve the portal on [default: [service] portal, "
              f"else {DEFAULT_LISTEN}]; another address than a loopback one only when asked.")
@click.option("--no-browser", is_flag=True, help="Print the address; do not open a browser.")
def portal(file: Path, run_dir: Path | None, listen: str | None, no_browser: bool) -> None:
    """Serve a web page to watch and operate the running service: its instances, the
    maintenance and the walks, a timeline of each walk, the history, logs and metrics.
    A client of the control API, as this command line is. The first line printed is the
    address to open, with the token that every request must carry."""
    try:
        from rolehost.portal.app import serve
    except ImportError as exc:
        missing = (exc.name or "a package").split(".")[0]
        fail(f"the portal needs the `portal` extra ({missing} is missing): "
             "pip install 'rolehost[portal]'")
    from rolehost import definition as model
    from rolehost.definition.scalars import parse_address

    try:
        definition = model.load(file)
    except model.DefinitionErrors as exc:
        fail(f"invalid definition:\n{exc}", EXIT_BAD_DEFINITION)
    try:
        host, port = parse_address(listen or definition.service.portal or DEFAULT_LISTEN)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    from rolehost.portal.source import Source

    token = secrets.token_urlsafe(24)
    shown = f"[{host}]" if ":" in host else host

    def listening(bound: int) -> None:
        url = f"http://{shown}:{bound}/?token={token}"
        click.echo(f"portal: {url}")
        sys.stdout.flush()
        if not no_browser:
            import webbrowser

            webbrowser.open(url)

    try:
        serve(Source(RunDir.for_definition(file, run_dir)), token, host, port, listening)
    except OSError as exc:
        fail(f"cannot listen on {shown}:{port}: {exc.strerror or exc}")
