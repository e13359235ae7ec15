"""`rolehost import`: a service of another platform, translated into a rolehost.toml."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rolehost.cli.common import cli, fail
from rolehost.control.exits import EXIT_BAD_DEFINITION, EXIT_FAILED


@cli.group(name="import")
def import_() -> None:
    """Translate a service of another platform into a rolehost.toml."""


@import_.command(name="azure")
@click.argument("csdef", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("cscfg", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("rolehost.toml"), show_default=True,
              help="File to write, never over an existing one; - for standard output.")
def import_azure(csdef: Path, cscfg: Path, output: Path) -> None:
    """Translate a Cloud Services ServiceDefinition.csdef and its
    ServiceConfiguration.cscfg: roles, instances, update domains, settings, endpoints
    (input, internal, instance input), local storage, startup tasks, probes and
    certificates. Each element rolehost cannot express is a warning naming its XML path
    and what to do; the entry points are left to fill in. Exit 2 if a file is not one
    rolehost can read (or is hostile XML), 1 if the translation does not validate."""
    from rolehost import definition as model
    from rolehost.importing import azure, toml

    try:
        translation = azure.translate(azure.read(csdef, "ServiceDefinition"),
                                      azure.read(cscfg, "ServiceConfiguration"))
    except azure.Refused as exc:
        fail(str(exc), EXIT_BAD_DEFINITION)
    text = toml.render(translation.document, translation.comments, [
        f"Translated by `rolehost import azure` from {csdef.name} and {cscfg.name}.",
        "Fill in each key whose comment says so, then run `rolehost check`.",
    ])
    try:
        model.parse(translation.document)
        invalid = ""
    except model.DefinitionErrors as exc:
        invalid = str(exc)
    if str(output) == "-":
        click.echo(text, nl=False)
    else:
        try:
            with open(output, "x", encoding="utf-8") as file:
                file.write(text)
        except FileExistsError:
            fail(f"{output} exists: the import never overwrites a file; move it away or "
                 "choose another --output")
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}")
        click.echo(f"wrote {output}")
    for gap in translation.gaps:
        click.echo(f"warning: {gap}", err=True)
    if invalid:
        click.echo(f"the translation does not validate yet:\n{invalid}", err=True)
        sys.exit(EXIT_FAILED)
