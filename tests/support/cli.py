"""The command line as a user runs it: `python -m rolehost ...` in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def rolehost(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `rolehost ARGS` to its end: its exit code, stdout and stderr (as text)."""
    return subprocess.run([sys.executable, "-m", "rolehost", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
