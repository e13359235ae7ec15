"""What the CLI says about the service and its operations, as plain functions of the
API's answers: the commands print these lines, and the portal (rolehost/portal) shows
the same ones, so that a walk or a reimage reads the same wherever it was started."""

from __future__ import annotations

from typing import Any

from rolehost.fabric.names import parse_instance_name
from rolehost.observability import times
from rolehost.observability.times import iso


def walk_header(walk: dict[str, Any], what: str) -> str:
    """The walk's first line. It counts the domains it walks: those with no instance (a
    role of 2 instances over 5 domains leaves 3 empty) are skipped."""
    walked = sum(1 for instances in walk["domains"] if instances)
    return f"walk {walk['id']}: {what} over {walked} update domain{'s' if walked != 1 else ''}"


def walk_step(step: dict[str, Any]) -> str:
    """One step of a walk: an instance of a domain reaching a point of its update."""
    return f"  UD {step['domain']}  {step['instance']:<16} {step['step']}"


def walk_end(snapshot: dict[str, Any]) -> tuple[list[str], str | None] | None:
    """How a walk ended, as (lines, failure), or None while it goes on. A paused walk has
    ended for its follower. `failure` is the error a command exits 1 with."""
    state, walk = snapshot["state"], snapshot["id"]
    if state == "succeeded":
        done = [f"walk {walk}: every update domain done in {snapshot['seconds']:.1f}s"]
        # What came after the last domain (a deploy's scale) may still have failed.
        return done, f"walk {walk}: {snapshot['error']}" if snapshot["error"] else None
    if state == "paused":
        return [f"walk {walk}: paused after update domain {snapshot['domain']}; "
                "`rolehost walk next` to go on"], None
    if state in ("halted", "aborted", "rolled back"):
        return [], (f"walk {walk} {state}: {snapshot['error'] or 'aborted'}"
                    + ("\n`rolehost walk abort` ends it" if state == "halted" else ""))
    return None


def walk_summary(snapshot: dict[str, Any]) -> list[str]:
    """`rolehost walk`: the walk as it stands, every instance's progress."""
    lines = [f"walk {snapshot['id']}: {snapshot['label']} ({snapshot['mode']}), "
             f"{snapshot['state']}, update domain {snapshot['domain']}"]
    for ud, instances in enumerate(snapshot["domains"]):
        lines += [f"  UD {ud}  {instance:<16} {snapshot['progress'][instance]}"
                  for instance in instances]
    if snapshot["error"]:
        lines.append(f"  error: {snapshot['error']}")
    return lines


def maintained(kind: str, row: dict[str, Any], wait: bool) -> str:
    """An instance a maintenance command was given: begun, or where it ended (`wait`)."""
    return f"{row['id']}: {row['state'] if wait else f'{kind} begun'}"


def scaled(role: str, count: int, changed: list[str]) -> str:
    """What a scale to `count` did, from the instances it names: a role's instances are
    always indexes 0 to count - 1, so those at `count` or above were removed, the others
    added (a scale does one or the other)."""
    removed = [name for name in changed if parse_instance_name(name)[1] >= count]
    added = [name for name in changed if name not in removed]
    what = (f"added {', '.join(added)}" if added else f"removed {', '.join(removed)}"
            if removed else "unchanged")
    return f"{role}: {count} instance{'s' if count > 1 else ''}, {what}"


def packaged(info: dict[str, Any]) -> str:
    return f"package {info['version']}: roles {', '.join(info['roles'])}"


def instance_detail(instance: dict[str, Any]) -> str:
    """The DETAIL column of `rolehost status`: why it is in its state, why a ready one is
    not back, its error once failed, when it tries again."""
    i = instance
    detail: str = i["reason"] if i["state"] != "ready" else i.get("why_not_back") or ""
    if i["last_error"] and i["state"] == "failed":
        detail = i["last_error"]
    if i["next_try"]:
        detail = detail.partition("; next try in")[0]
        detail += f" (next try {times.clock(i['next_try'])})"
    return detail


def operation_row(op: dict[str, Any]) -> tuple[str, str, str, str, str, str, str]:
    """An operation of the history as `rolehost ops` shows it: id, began, kind, outcome,
    duration, instances, the first line of its error."""
    seconds = f"{op['ended'] - op['started']:.1f}s" if op["ended"] else "-"
    error = op["error"].splitlines()[0] if op["error"] else ""
    return (op["id"], times.clock(iso(op["started"])), op["kind"], op["outcome"], seconds,
            ",".join(op["instances"]), error)


def success_rate(history: dict[str, Any]) -> str:
    rate = history["success_rate"]
    return "success rate: " + ("-" if rate is None else f"{rate:.0%}")


def slots(status: dict[str, Any]) -> list[str]:
    """What `status` says of the slots: nothing while production is the only one (the
    common case), else each slot's version and deployment, the one shown marked."""
    found = status.get("slots") or {}
    if len(found) < 2:
        return []
    return [f"{'>' if name == status.get('slot') else ' '} {name:<10} version "
            f"{d['version']:<16} deployment {d['deployment_id'][:12]}  "
            f"{d['instances']} instance{'s' if d['instances'] != 1 else ''}"
            for name, d in found.items()]


def staged(status: dict[str, Any]) -> list[str]:
    """A staging deploy's answer: the deployment, and where its endpoints listen."""
    back = sum(1 for i in status["instances"] if i["back"])
    return [f"staging: version {status['version']}, deployment "
            f"{status['deployment_id'][:12]}, {back}/{len(status['instances'])} instances "
            "back",
            *(f"  {b['role']}.{b['endpoint']} on {b['address']}" for b in status["balancers"])]


def swapped(slots: dict[str, Any]) -> list[str]:
    """A swap's answer: which version each slot's ports now reach."""
    return [f"{name}: version {d['version']} (deployment {d['deployment_id'][:12]})"
            for name, d in slots.items()]


def deleted(slot: str, answer: dict[str, Any]) -> str:
    """`rolehost delete --slot`'s answer: the version and deployment it removed."""
    return (f"deleted {slot}: version {answer['deleted']} "
            f"(deployment {answer['deployment_id'][:12]})")
