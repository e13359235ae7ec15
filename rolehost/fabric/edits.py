"""Edits of `rolehost.toml` while the service runs: what an edit asks for, and applying
it. Settings and instance counts apply in place (as `rolehost config set` and
`rolehost scale` would); any other change needs a package and a deploy, and is only
reported. See docs/walks.md (changes of the definition file)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from typing import TYPE_CHECKING, Any

import structlog

from rolehost.definition import Definition, DefinitionErrors
from rolehost.definition import load as load_definition
from rolehost.fabric.errors import DomainError, Invalid

if TYPE_CHECKING:
    from rolehost.fabric.controller import Controller

log = structlog.get_logger()


def definition_changes(running: Definition, edited: Definition,
                       before: Definition | None = None,
                       unsettled: Collection[str] = ()) -> dict[str, Any]:
    """What an edit of the definition asks for: new settings and instance counts, which
    apply in place, and every other key path, which needs a deploy. `running` names the
    app folders the running version was packaged from, as `edited` does.

    `before` is the file as it was before the edit (default: `running`). Settings and
    counts are what the edit changed in it, applied to what runs: a setting changed by
    `rolehost config set`, or a count by `rolehost scale`, stays as it is unless the
    edit changes that setting or that count. Each role's settings are its whole new
    table: a setting the edit removed is left out, one set at run time kept.

    `unsettled` names the roles whose count an earlier edit asked for and did not get
    (refused, or its new instances never got ready): the file's count applies to them
    even where the file did not change it, so that saving the file as it was before
    takes the failed scale back."""
    settings, instances, deploy = {}, {}, []
    ignored = {"settings", "instances"}
    if running.service != edited.service:
        deploy.append("service (needs a fresh start: rolehost stop, rolehost start)")
    for name in sorted(running.roles.keys() | edited.roles.keys()):
        old, new = running.roles.get(name), edited.roles.get(name)
        if old is None or new is None:
            deploy.append(f"roles.{name}")
            continue
        if old.model_dump(exclude=ignored) != new.model_dump(exclude=ignored):
            deploy += [f"roles.{name}.{k}" for k in sorted(type(old).model_fields)
                       if k not in ignored and getattr(old, k) != getattr(new, k)]
        was = (before or running).roles.get(name, old)
        edits = {k: v for k, v in new.settings.items() if was.settings.get(k) != v}
        gone = was.settings.keys() - new.settings.keys()
        table = {k: v for k, v in {**old.settings, **edits}.items()  # Secrets stay wrapped
                 if k not in gone}
        if table != old.settings:
            settings[name] = table
        if new.instances != old.instances and (new.instances != was.instances
                                               or name in unsettled):
            instances[name] = new.instances
    return {"settings": settings, "instances": instances, "deploy": deploy}


class Edits:
    """Applies the saved edits of the controller's definition file, one at a time, each
    read when its turn comes: an edit saved while another is applied is compared with
    the file as that one left it, not as it was before."""

    def __init__(self, controller: Controller, definition: Definition) -> None:
        self.controller = controller
        # The file as last applied: an edit applies what it changed in it.
        self.from_file = definition
        self._lock = asyncio.Lock()
        self._unsettled: set[str] = set()  # roles whose count from the file is still to do

    def saved(self) -> None:
        """The file was saved: apply settings and instance counts; report the rest."""
        self.controller.in_background(self._edit())

    async def _edit(self) -> None:
        controller = self.controller
        async with self._lock:
            if controller.stopping:  # nothing starts while the service stops
                return
            try:
                edited = load_definition(controller.definition_path)
            except DefinitionErrors as exc:
                log.error("definition_invalid", file=str(controller.definition_path),
                          errors=str(exc))
                return
            # A save is a config change: renewed certificates are taken (their paths, if
            # they changed, are the deploy's, below).
            try:
                controller.renew_certificates()
            except Invalid as exc:
                log.error("certificate_not_renewed", error=str(exc))
            # The running roles' `app` is the package's copy: compare the folder it was
            # copied from, or every edit would seem to move every app.
            sources = controller.packages.source_apps(controller.version)
            running = controller.definition.model_copy(update={"roles": {
                name: role.model_copy(update={"app": sources.get(name, role.app)})
                for name, role in controller.definition.roles.items()}})
            changed = definition_changes(running, edited, self.from_file, self._unsettled)
            if changed["deploy"]:
                log.warning("needs_deploy", changed=changed["deploy"],
                            detail="nothing was applied: package and deploy these changes")
                return
            await self._apply(edited, changed["settings"], changed["instances"])

    async def _apply(self, edited: Definition, settings: dict[str, dict[str, Any]],
                     counts: dict[str, int]) -> None:
        """One change after the other: each holds the service while it runs. The file as
        last applied (`from_file`) takes, role by role, the settings and the count that
        were applied (or had nothing to apply); a change refused or failed stays to do,
        so that saving the file again tries it again."""
        controller = self.controller
        took: dict[str, dict[str, Any]] = {name: {} for name in edited.roles}
        for name, values in settings.items():
            if not await _reported(controller.configure(name, values, "definition edited",
                                                        replace=True)):
                took[name]["settings"] = self.from_file.roles[name].settings
        for name, count in counts.items():
            if await _reported(controller.scale(name, count, "definition edited")):
                self._unsettled.discard(name)
            else:
                self._unsettled.add(name)
                took[name]["instances"] = self.from_file.roles[name].instances
        self.from_file = edited.model_copy(update={"roles": {
            name: role.model_copy(update=took[name]) for name, role in edited.roles.items()}})


async def _reported(change: Awaitable[object]) -> bool:
    """A change an edit asked for: nobody waits for its answer, so a refusal is logged (and
    the next change is still tried). False if it was refused or failed."""
    try:
        await change
    except DomainError as exc:
        log.error("change_failed", error=str(exc))
        return False
    return True
