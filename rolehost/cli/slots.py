"""The deployment slots: `swap`, and `delete --slot staging` (deploy and status take
`--slot` where they are)."""

from __future__ import annotations

from pathlib import Path

import click

from rolehost.cli.common import call, cli, connect, file_option, run_dir_option


@cli.command()
@file_option
@run_dir_option
def swap(file: Path, run_dir: Path | None) -> None:
    """Swap the deployments of the production and staging slots (the VIP swap): every
    input endpoint's public port sends new requests to the former staging instances at
    once, requests in flight finish where they are, and the former production goes on
    on the staging ports, ready for a swap back. Refused, with nothing touched, without a
    staging deployment (exit 2), or when the endpoints differ or a staging instance is
    not back (exit 1)."""
    from rolehost.control import wording

    for line in wording.swapped(call(connect(file, run_dir).swap)):
        click.echo(line)


@cli.command()
@file_option
@run_dir_option
@click.option("--slot", type=click.Choice(["staging"]), required=True,
              help="The slot whose deployment to delete.")
def delete(file: Path, run_dir: Path | None, slot: str) -> None:
    """Stop the deployment in SLOT (staging), remove its disks and close its ports. Its
    instances' logs stay."""
    from rolehost.control import wording

    deleted = call(connect(file, run_dir, timeout=600).delete_slot, slot)
    click.echo(wording.deleted(slot, deleted))
