"""A user that limited work runs as: its ids, its environment, and handing folders to it."""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Unusable(Exception):
    """The `limited_user` the definition names cannot run the service's hosts, or the
    run directory is not rolehost's to open to it."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> User:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise Unusable(f"[service] limited_user: there is no user {name!r} on this "
                           "machine") from None
        return cls(name, entry.pw_uid, entry.pw_gid)

    def spawn_options(self) -> dict[str, Any]:
        """`subprocess.Popen` arguments that start a process as this user, and no group
        of root's: the drop happens in the child between fork and exec."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def environment(self, home: Path) -> dict[str, str]:
        """The user's own identity, and a home on the instance's OS disk: root's home is
        closed to it, and tools that write to `~` need one."""
        return {"USER": self.name, "LOGNAME": self.name, "HOME": str(home)}

    def give(self, *paths: Path) -> None:
        for path in paths:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def give_tree(self, root: Path) -> None:
        """Hand over a tree the controller made: from the leaves up, so that the user
        can change no folder (a link in place of a subfolder) before the walk is done
        with it."""
        for folder, dirs, files in os.walk(root, topdown=False):
            self.give(*(Path(folder, name) for name in (*dirs, *files)))
        self.give(root)

    def lend_tree(self, root: Path) -> None:
        """Make a tree the controller made readable to this user, and no more: root's,
        in the user's group (its own: no other user is in it), group read and search,
        nothing for others. From the leaves up, as `give_tree`; links are left as they
        are (a link's own mode means nothing)."""
        for folder, dirs, files in os.walk(root, topdown=False):
            for name in (*dirs, *files):
                self._lend(Path(folder, name))
        self._lend(root)

    def _lend(self, path: Path) -> None:
        os.chown(path, os.geteuid(), self.gid, follow_symlinks=False)
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return
        readable = 0o750 if stat.S_ISDIR(mode) or mode & 0o100 else 0o640
        os.chmod(path, (mode & 0o700) | (readable & 0o050))
