"""What every command of `rolehost` shares: the group, the `-f` and `--run-dir` options,
calling the controller, failing with the right exit code, loading the definition.

The command modules import, at their top, only what declaring the commands needs (click,
this module, the client, the exit codes): every command's start pays for those. What a
command uses (the model, the fabric, the logs) it imports in its body, so that `rolehost
status` starts without pydantic (issue 23; tests/test_cli_imports.py)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rolehost.client import ApiError, Client, ControllerNotRunning
from rolehost.control.exits import EXIT_BAD_DEFINITION, EXIT_FAILED, for_kind
from rolehost.fabric.rundir import RunDir

if TYPE_CHECKING:
    from rolehost import definition as model

DETACH_TIMEOUT = 60.0

file_option = click.option(
    "-f", "--file", "file", type=click.Path(path_type=Path), default=Path("rolehost.toml"),
    show_default=True, help="The service definition.",
)
run_dir_option = click.option(
    "--run-dir", type=click.Path(path_type=Path), envvar="ROLEHOST_RUN_DIR",
    help="Run directory [default: .rolehost/ beside the definition].",
)


slot_option = click.option(
    "--slot", type=click.Choice(["production", "staging"]), default="production",
    show_default=True, help="The deployment slot (docs/deploying.md).")


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"rolehost: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def user_of(file: Path) -> Iterator[None]:
    """Exit 2 naming `file` when its `[service] limited_user` cannot run the hosts:
    decided only when a deployment is prepared, long after the definition was read."""
    from rolehost.processes import privileges

    try:
        yield
    except privileges.Unusable as exc:
        fail(f"{file}: {exc}", EXIT_BAD_DEFINITION)


def offline(ask: Callable[[], Any], kept: Path, read: Callable[[Path], Any]) -> Any:
    """The controller's answer, or, when none runs, what it would have read from `kept`
    in the run directory: what was recorded there outlives the controller."""
    def answer() -> Any:
        try:
            return ask()
        except ControllerNotRunning:
            if not kept.exists():
                raise
            return read(kept)

    return call(answer)


def connect(file: Path, run_dir: Path | None, timeout: float = 30.0) -> Client:
    return Client(RunDir.for_definition(file, run_dir).socket, timeout=timeout)


def call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ControllerNotRunning as exc:
        fail(str(exc))
    except ApiError as exc:
        fail(str(exc), for_kind(exc.kind))


def load_checked(file: Path, controller: bool = False) -> model.Definition:
    """The validated definition, entry points included; exit 2 with every problem if not.
    `controller`: for a controller on this machine (start, check), which chooses the
    instances' private ports among those the definition leaves (run-instance and the
    exports' instances have ports of their own)."""
    from rolehost import definition as model
    from rolehost.balancer import tls
    from rolehost.fabric import ports, preflight

    try:
        definition = model.load(file)
    except model.DefinitionErrors as exc:
        fail(f"invalid definition:\n{exc}", EXIT_BAD_DEFINITION)
    errors = preflight.entry_points(definition, file) + tls.problems(definition, file)
    if controller:
        errors += ports.crowding(definition, file)
    if errors:
        fail(f"invalid definition:\n{model.DefinitionErrors(errors)}", EXIT_BAD_DEFINITION)
    return definition


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rolehost")
def cli() -> None:
    """Run Python roles with the lifecycle rules of Azure Cloud Services, and rehearse
    the platform's maintenance on them."""
