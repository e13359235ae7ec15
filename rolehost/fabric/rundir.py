"""The run directory: where a controller keeps its socket, lock, logs and instances.

Default: `.rolehost/` beside the definition. It is 0700 and its control socket 0600,
so only the user who started the controller can reach it. A root controller that drops
privileges makes it 0711, so its limited user can pass through to `instances/`; the
socket, `logs/`, `packages/` and the history stay private. A folder others use is never
made private: it is refused. A folder rolehost did not create, and that holds anything
but a run directory's own files, is never opened: a root controller with a limited user
refuses it (privileges.py).
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Everything a controller keeps in its run directory (the layout in docs/concepts.md).
_OWN = frozenset({"control.sock", "controller.pid", "history.jsonl", "instances", "logs",
                  "packages", ".made-by-rolehost"})
# Written into a run directory rolehost created: whatever else comes to live there (a
# sample's database), the folder is rolehost's to open to its limited user.
_MADE = ".made-by-rolehost"


class AlreadyRunning(RuntimeError):
    """Another controller holds this run directory."""


class Unsuitable(ValueError):
    """The folder cannot be a run directory: its path is too long, or others use it."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_definition(cls, definition: Path, run_dir: Path | None = None) -> RunDir:
        if run_dir is not None:
            return cls(Path(run_dir).resolve())
        return cls(Path(definition).resolve().parent / ".rolehost")

    @property
    def socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def instances(self) -> Path:
        return self.path / "instances"

    @property
    def pidfile(self) -> Path:
        return self.path / "controller.pid"

    @property
    def console_log(self) -> Path:
        return self.logs / "console.log"

    def instance_log(self, instance_id: str) -> Path:
        return self.logs / f"{instance_id}.log"

    def ensure(self) -> None:
        """Create the run directory, or make it private again; Unsuitable for a folder
        that is not one and is open to others, or a path too long for the socket."""
        self._refuse_a_shared_folder()
        made = not self.path.exists()
        # Private, and so is what it holds: a root controller opens the folder itself to
        # its limited user (privileges.py), so the folders inside must not rely on it.
        for folder in (self.path, self.logs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)  # an existing folder may have been created looser
        if made:
            (self.path / _MADE).touch(mode=0o600)
        if len(os.fsencode(self.socket)) > _MAX_SOCKET_PATH:
            raise Unsuitable(
                f"run directory path too long for a Unix socket ({self.socket}); "
                "choose a shorter one with --run-dir"
            )

    def strangers(self) -> list[str]:
        """The names in the folder that are no run directory's, sorted: [] for one rolehost
        made, whatever it holds since (its mark says so), or one that holds nothing but a
        run directory's names (made by a rolehost before the mark), or none yet. Not by
        who last used it: a folder such as /root that once served as a run directory
        (under limited_user = "root", say) is still not rolehost's to open."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return [] if _MADE in names else sorted(n for n in names if n not in _OWN)

    def _refuse_a_shared_folder(self) -> None:
        # Making private a folder that others use (/tmp, a home, a shared 1777 folder)
        # would lock them out and lose its sticky bit. A folder that has held a
        # controller (its pid file stays) is a run directory; so is an empty one, unless
        # anyone may write to it: that one is shared by design, even while empty.
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & ~0o700 == 0 or self.pidfile.exists():
                return
            shared = mode & (stat.S_ISVTX | stat.S_IWOTH)
            if not shared and not any(self.path.iterdir()):
                return
        except FileNotFoundError:
            return
        raise Unsuitable(
            f"{self.path} is not a run directory and is open to others (mode {mode:o}): "
            f"rolehost would make it private (0700) and lock them out. Give --run-dir a "
            f"folder of the service's own, a new or empty one such as "
            f"{self.path / 'rolehost'}"
        )

    def lock(self) -> int:
        """Take the run directory for this process; AlreadyRunning if another has it.

        The lock is an flock on the pid file, so it dies with its holder, `kill -9`
        included. Returns the descriptor, which must stay open while the controller runs.
        """
        fd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode().strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another controller (pid {holder}) is already running on {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def holder(self) -> int | None:
        """The pid of the controller holding the lock, or None when none does."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode().strip()
            return int(text) if text.isdigit() else None
        else:
            return None
        finally:
            os.close(fd)
