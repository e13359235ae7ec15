"""What a host says over its channel (rolehost/protocol.py), and what the instance makes
of it: a state it reports, a recycle it asks for, an error of the role's (one that
overran stop_timeout counts against the stop), the answer to a `changing`, and the
heartbeats that sample its CPU and its disks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from rolehost import protocol
from rolehost.fabric.lifecycle import State

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance

log = structlog.get_logger()


def on_message(instance: Instance, message: protocol.Message) -> tuple[State, str] | None:
    """Take in one message; the state and reason it moves the instance to, if any (the
    instance changes it: `Instance._set` is the one place a state changes)."""
    life, kind = instance.life, message["type"]
    if kind == "state":
        state, reason = State(message["state"]), str(message.get("reason") or "")
        if (new := life.reported(state)) is not None:
            return new, reason
    elif kind == "recycle":
        life.recycle_reason = str(message.get("reason", "recycle requested"))
        if message.get("graceful"):
            instance.recycle_asked.set()
    elif kind == "error":
        where, text = str(message.get("where")), str(message.get("traceback", ""))
        instance.last_traceback = text
        summary = text.strip().splitlines()[-1] if text.strip() else "failed"
        instance.last_error = life.run_error = f"{where}: {summary}"
        log.error("role_error", instance=instance.id, where=where, error=summary)
        if message.get("timed_out"):
            life.stop.overran()
    elif kind == "changing_result" and (answer := instance.changing_answer) is not None:
        if not answer.done():
            answer.set_result(bool(message.get("cancel")))
    elif kind == "heartbeat":
        instance.sample_cpu()
        if instance.usage.due:
            instance.measure()
    return None
