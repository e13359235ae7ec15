"""Checks that need more than the definition itself: can each entry point, and each
site's application, be loaded?

Each role's entry point is imported in a throw-away interpreter, so a module's import
side effects, or a crash in it, never touch the caller.

In the controller the interpreters are spawned and waited for on the event loop
(`check_entry_points`, through `process.run`), never on a worker thread: the orphan
reaper could take a child's exit status between its exit and a thread's wait, and
subprocess would then report exit code 0, so a module that fails to import would pass.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rolehost.definition import Definition, DefinitionError, Role
from rolehost.processes import process

IMPORT_TIMEOUT = 60.0
CONCURRENCY = 8  # interpreters importing at once


async def check_entry_points(
    definition: Definition, file: Path | None
) -> list[DefinitionError]:
    """One error per role whose entry point cannot be imported as a RoleEntryPoint, in
    the order of the roles. On the running loop: the controller's, whose orphan reaper
    leaves these children alone."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def check(name: str, role: Role) -> DefinitionError | None:
        if not role.app.is_dir():
            return _missing(file, name, role.app)
        async with limit:
            try:
                done = await process.run(_argv(role), cwd=role.app, timeout=IMPORT_TIMEOUT)
            except TimeoutError:
                done = None
        return _judge(file, name, role, done)

    found = await asyncio.gather(*(check(n, r) for n, r in definition.roles.items()))
    return [e for e in found if e is not None]


def entry_points(definition: Definition, file: Path | None) -> list[DefinitionError]:
    """`check_entry_points` for a caller without an event loop (the CLI, before it
    starts anything). Each child is waited for on a worker thread: refused in a process
    whose orphan reaper is on, which must await `check_entry_points` on its loop."""
    if process.reaping_orphans():
        raise RuntimeError("this process reaps orphans: await check_entry_points on its loop")

    def check(item: tuple[str, Role]) -> DefinitionError | None:
        name, role = item
        if not role.app.is_dir():
            return _missing(file, name, role.app)
        # In the caller's process group: a Ctrl-C at the CLI reaches the import too.
        with subprocess.Popen(_argv(role), cwd=role.app, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
            try:
                stdout, stderr = child.communicate(timeout=IMPORT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.signal_tree(child.pid, None, signal.SIGKILL)  # and its descendants
                child.wait()
                return _judge(file, name, role, None)
        return _judge(file, name, role, process.Completed(child.returncode, stdout, stderr))

    items = list(definition.roles.items())
    with ThreadPoolExecutor(max_workers=max(1, min(CONCURRENCY, len(items)))) as pool:
        return [e for e in pool.map(check, items) if e is not None]


def _argv(role: Role) -> list[str]:
    site = [role.site.application] if role.site else []
    return [sys.executable, "-m", "rolehost.host", "--check", role.entry_class, str(role.app),
            *site]


def _missing(file: Path | None, name: str, app: Path) -> DefinitionError:
    return DefinitionError(file, f"roles.{name}.app", f"folder not found: {app}")


def _judge(file: Path | None, name: str, role: Role,
           done: process.Completed | None) -> DefinitionError | None:
    """The error of one role's check, if any (`done` None: the import timed out)."""
    key, entry_point, app = f"roles.{name}.entry_point", role.entry_class, role.app
    if done is not None and done.returncode == 3 and role.site is not None:
        key, entry_point = f"roles.{name}.site.{role.site.interface}", role.site.application
    if done is None:
        return DefinitionError(file, key, f"importing {entry_point} took over {IMPORT_TIMEOUT:g}s")
    if done.returncode == 0:
        return None
    detail = "\n    ".join(_user_frames(done.stderr.decode("utf-8", "replace"))[-15:])
    return DefinitionError(file, key, f"cannot load {entry_point} from {app}:\n    {detail}")


def _user_frames(traceback: str) -> list[str]:
    """A traceback without the frames of importlib and rolehost: they say nothing about
    the user's module. A frame is its `  File ...` line and the lines indented under it."""
    kept, skipping = [], False
    for line in traceback.strip().splitlines():
        if line.startswith("  File "):
            skipping = any(s in line for s in ("<frozen importlib", "/importlib/", _PACKAGE))
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    if len(kept) > 1 and kept[0].startswith("Traceback") and not kept[1].startswith("  File "):
        kept.pop(0)  # every frame was ours: the header would stand alone
    return kept


_PACKAGE = str(Path(__file__).parents[1]) + "/"  # rolehost/: its frames say nothing
