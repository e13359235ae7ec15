"""What the portal's buttons do: each calls the one control API operation the CLI's
command calls, and answers with the lines the command prints (rolehost/control/wording.py),
its failure, and what the page follows next to show the progress: the walk's steps, or
the state changes of the instances it touched.

Every argument is checked here before the API is called: the body came from a browser.
"""

from __future__ import annotations

from typing import Any

from rolehost.client import ApiError, ControllerNotRunning
from rolehost.control import wording
from rolehost.definition.scalars import setting_from_text
from rolehost.fabric.disks import Upgrade
from rolehost.observability import logs
from rolehost.portal.source import Source

CAUSE = "requested through the portal"
MAINTENANCE = ("restart", "reimage", "rebuild", "recycle")
SLOTS = ("production", "staging")
# A staging deploy answers once its instances are back, as `rolehost deploy --slot
# staging` does: the page waits as long as the command.
STAGING_DEPLOY_TIMEOUT = 24 * 3600.0


class BadInput(ValueError):
    """The form's values are not what the action takes."""


Answer = dict[str, Any]


def _answer(lines: list[str], failure: str | None = None,
            follow: dict[str, Any] | None = None) -> Answer:
    return {"lines": lines, "failure": failure, "follow": follow}


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadInput(f"{key} must be given")
    return value


def _flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadInput(f"{key} must be true or false")
    return value


def _slot(body: dict[str, Any]) -> str:
    slot = body.get("slot", "production")
    if slot not in SLOTS:
        raise BadInput("slot must be production or staging")
    return str(slot)


def act(source: Source, action: str, body: dict[str, Any]) -> Answer:
    """Carry out `action` (the path after /act/) with the form's `body`."""
    try:
        try:
            return _act(source, action, body)
        finally:
            source.forget()  # the page's next look shows what the action changed
    except BadInput as exc:
        return _answer([], str(exc))
    except ApiError as exc:
        return _answer([], exc.message)
    except ControllerNotRunning as exc:
        return _answer([], str(exc))


def _last_seq(source: Source) -> int:
    events = source.events_after(0)
    return events[-1]["seq"] if events else 0


def _act(source: Source, action: str, body: dict[str, Any]) -> Answer:
    client = source.client
    kind, _, arg = action.partition("/")
    if kind == "instance":
        name, slot = _text(body, "instance"), _slot(body)
        since = _last_seq(source)
        if arg == "status-check":
            if slot != "production":  # the API asks production's instances only
                raise BadInput("status checks are run on production's instances")
            client.check_status(name)
            return _answer([f"{name}: status check requested"])
        if arg not in MAINTENANCE:
            raise BadInput(f"no such instance action: {arg}")
        rows = client.request("POST", f"/v1/operations/{arg}",
                              {"instances": [name], "wait": False, "cause": CAUSE, "slot": slot})
        return _answer([wording.maintained(arg, row, False) for row in rows], None,
                       {"kind": "instances", "names": [r["id"] for r in rows], "since": since,
                        "slot": slot})
    if kind == "upgrade":
        if arg not in {u.value for u in Upgrade}:
            raise BadInput(f"no such upgrade: {arg}")
        walk = client.upgrade(arg, _flag(body, "manual"))
        return _answer([wording.walk_header(walk, f"upgrade {arg}")], None,
                       {"kind": "walk", "since": 0})
    if kind == "deploy":
        version, slot = _text(body, "version"), _slot(body)
        if slot == "staging":
            status = client.deploy(version, slot=slot, timeout=STAGING_DEPLOY_TIMEOUT)
            return _answer(wording.staged(status))
        walk = client.deploy(version, _flag(body, "rollback", True), _flag(body, "manual"))
        return _answer([wording.walk_header(walk, f"deploy {version}")], None,
                       {"kind": "walk", "since": 0})
    if kind == "swap":
        return _answer(wording.swapped(client.swap()))
    if kind == "slot" and arg == "delete":
        slot = _slot(body)
        return _answer([wording.deleted(slot, client.delete_slot(slot))])
    if kind == "package":
        return _answer([wording.packaged(client.package(None))])
    if kind == "config":
        role, settings = _text(body, "role"), {}
        for assignment in _text(body, "assignments").split():
            key, sep, value = assignment.partition("=")
            if not sep or not key:
                raise BadInput(f"not KEY=VALUE: {assignment!r}")
            settings[key] = setting_from_text(value)
        outcome = client.configure(role, settings)
        return _answer([f"{instance}: {what}" for instance, what in outcome.items()])
    if kind == "scale":
        role, count = _text(body, "role"), body.get("count")
        try:
            number = int(count)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise BadInput("count must be a whole number") from None
        return _answer([wording.scaled(role, number, client.scale(role, number))])
    if kind == "walk" and arg in ("next", "abort"):
        snapshot = client.walk(arg)
        if arg == "next":
            shown = snapshot["steps"][-1]["seq"] if snapshot["steps"] else 0
            return _answer([], None, {"kind": "walk", "since": shown})
        return _answer(wording.walk_summary(snapshot))
    raise BadInput(f"no such action: {action}")


def follow_walk(source: Source, since: int) -> Answer:
    """The walk's steps after the `since`-th, and, once it is over, how it ended: the
    lines `rolehost upgrade` prints as it follows a walk."""
    snapshot = source.client.walk(None, since)
    lines = [wording.walk_step(step) for step in snapshot["steps"]]
    shown = snapshot["steps"][-1]["seq"] if snapshot["steps"] else since
    end = wording.walk_end(snapshot)
    if end is None:
        return {"lines": lines, "failure": None, "since": shown, "done": False}
    ended, failure = end
    return {"lines": lines + ended, "failure": failure, "since": shown, "done": True}


def follow_instances(source: Source, names: list[str], since: int,
                     slot: str = "production") -> Answer:
    """The state changes of `names` in `slot` after event `since`, as the console prints
    them; done once each has changed and is ready (or failed) again. (A staging instance
    has the name of a production one: its events say their slot.)"""
    events = [e for e in source.events_after(since) if e.get("instance") in names
              and e.get("event") == "state" and e.get("slot", "production") == slot]
    latest = {e["instance"]: e["state"] for e in events}
    done = all(latest.get(n) in ("ready", "failed") for n in names)
    return {"lines": [logs.render_event(_json(e)) for e in events],
            "since": events[-1]["seq"] if events else since, "done": done, "failure": None}


def _json(event: dict[str, Any]) -> str:
    import json

    return json.dumps(event)
