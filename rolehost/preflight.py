"""Checks that need more than the definition itself: can each entry point be loaded?

Each role's entry point is imported in a throw-away interpreter, so a module's import
side effects, or a crash in it, never touch the caller.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rolehost.definition import Definition, DefinitionError

IMPORT_TIMEOUT = 60.0


def entry_points(definition: Definition, file: Path | None) -> list[DefinitionError]:
    """One error per role whose entry point cannot be imported as a RoleEntryPoint."""

    def check(item: tuple[str, str, Path]) -> DefinitionError | None:
        name, entry_point, app = item
        key = f"roles.{name}.entry_point"
        if not app.is_dir():
            return DefinitionError(file, f"roles.{name}.app", f"folder not found: {app}")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "rolehost.host", "--check", entry_point, str(app)],
                cwd=app, capture_output=True, text=True, timeout=IMPORT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return DefinitionError(
                file, key, f"importing {entry_point} took over {IMPORT_TIMEOUT:g}s"
            )
        if done.returncode == 0:
            return None
        detail = "\n    ".join(_user_frames(done.stderr)[-15:])
        return DefinitionError(file, key, f"cannot load {entry_point} from {app}:\n    {detail}")

    items = [(n, r.entry_point, r.app) for n, r in definition.roles.items()]
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return [e for e in pool.map(check, items) if e is not None]


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


_PACKAGE = str(Path(__file__).parent) + "/"
