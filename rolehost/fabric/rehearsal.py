"""`rolehost check`'s rehearsal: boot each role and put it through the platform's month.

One instance per role, in a scratch run directory, goes through
start -> restart -> reimage -> rebuild -> restart and must be ready after each step.
The two classic startup bugs are named when they show:
- a `once_per = "start"` task that succeeded once and fails on its next run
  (it is not idempotent);
- a role that fails after a reimage while a task was skipped because its marker lives
  beside the local resources (`once_per = "disk"`), though reimage wiped `os/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rolehost.definition import Definition
from rolehost.fabric.disks import Maintenance
from rolehost.fabric.errors import DomainError
from rolehost.fabric.instance import Instance
from rolehost.fabric.launcher import Launcher
from rolehost.fabric.lifecycle import State
from rolehost.observability import logs, output

STEPS: list[tuple[str, Maintenance]] = [
    ("start", Maintenance.START),
    ("restart", Maintenance.RESTART),
    ("reimage", Maintenance.REIMAGE),
    ("rebuild", Maintenance.REBUILD),
    ("restart", Maintenance.RESTART),
]


@dataclass
class Step:
    name: str
    ok: bool
    state: str
    seconds: float
    error: str | None
    tasks: list[dict[str, Any]]
    hints: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Report:
    run_dir: Path
    roles: dict[str, list[Step]]

    @property
    def ok(self) -> bool:
        return all(len(s) == len(STEPS) and all(x.ok for x in s) for s in self.roles.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_dir": str(self.run_dir),
                "roles": {r: [s.to_json() for s in steps] for r, steps in self.roles.items()}}


async def rehearse(definition: Definition, roles: list[str] | None = None) -> Report:
    """Rehearse `roles` (default: all) of `definition`; the scratch folder is removed if
    every step passed, and kept for inspection otherwise."""
    run_dir = Path(tempfile.mkdtemp(prefix="rolehost-check-"))
    try:
        logs.configure(run_dir / "logs", None)
        launcher = Launcher(definition.service, run_dir, None)
    except BaseException:  # no step ran: there is nothing to inspect
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    # No stop signals taken: Ctrl-C cancels `check` (asyncio.run), and the instances
    # stop below all the same.
    launcher.supervise()
    names = roles or list(definition.roles)
    instances = {n: Instance(launcher.deployment, n, definition.roles[n], 0) for n in names}
    try:
        results = await asyncio.gather(*(_walk(i) for i in instances.values()))
    finally:
        await launcher.stop(list(instances.values()), "rehearsal over")
        launcher.close(instances.values())
    report = Report(run_dir, dict(zip(names, results, strict=True)))
    if report.ok:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


async def _walk(instance: Instance) -> list[Step]:
    steps: list[Step] = []
    for name, kind in STEPS:
        began = time.monotonic()
        if kind is Maintenance.START:
            instance.start()
            state = await instance.settled()
        else:
            with contextlib.suppress(DomainError):  # the state below tells what happened
                await instance.maintain(kind, "rehearsal", wait=True)
            state = instance.state
        ok = state is State.READY
        step = Step(
            name=name, ok=ok, state=state.value, seconds=round(time.monotonic() - began, 3),
            error=None if ok else (instance.last_error or instance.reason),
            tasks=instance.tasks.snapshot() if instance.tasks is not None else [],
        )
        if not ok:
            step.output = [output.render(line) for line in logs.tail(instance.output.path, 15)]
            step.hints = _diagnose(step, steps)
        steps.append(step)
        if not ok:
            break
    return steps


def _diagnose(step: Step, before: list[Step]) -> list[str]:
    hints = []
    succeeded_before = {t["index"] for s in before for t in s.tasks if t["state"] == "succeeded"}
    for task in step.tasks:
        if task["state"] == "failed" and task["index"] in succeeded_before:
            hints.append(
                f"task {task['index']} succeeded before and failed on its next run at "
                f"{step.name}: it is not idempotent. Make it safe to run again (a command "
                f"that tolerates what it already did), or, if its effect lasts, run it once "
                f"with once_per = \"image\" (effect in os/) or \"disk\" (effect in resources/)."
            )
    if step.name == "reimage" and not any(t["state"] == "failed" for t in step.tasks):
        for task in step.tasks:
            if task["state"] == "skipped" and task["once_per"] == "disk":
                hints.append(
                    f"task {task['index']} was skipped: its marker is kept beside the local "
                    f"resources (once_per = \"disk\"), but reimage wiped os/. If what it set up "
                    f"lives in os/ (installed tools, machine state, TMPDIR), use "
                    f"once_per = \"image\" so the marker is wiped with it."
                )
    return hints


def render(report: Report) -> str:
    lines = []
    for role, steps in report.roles.items():
        lines.append(f"role {role}:")
        for step in steps:
            status = f"ready in {step.seconds:.2f}s" if step.ok else f"FAILED ({step.state})"
            lines.append(f"  {step.name:<8} {status}")
            for task in step.tasks:
                code = "" if task["exit_code"] is None else f", exit {task['exit_code']}"
                lines.append(f"           task {task['index']} {task['state']}{code}"
                             f" ({task['once_per']}): {task['reason']}")
            if not step.ok:
                lines.append(f"           error: {step.error}")
                lines += [f"           | {line}" for line in step.output]
                lines += [f"           hint: {hint}" for hint in step.hints]
        for name, _ in STEPS[len(steps):]:
            lines.append(f"  {name:<8} not run")
    verdict = (
        "every step passed" if report.ok else f"FAILED (scratch run dir kept: {report.run_dir})"
    )
    lines.append(f"rehearsal: {verdict}")
    return "\n".join(lines)
