"""A user of its own for each role: uids allocated from a reserved range, as systemd's
DynamicUser does, so that one role cannot signal another's processes or write its folders.

Each role of a run directory gets the uid (and the gid of the same number) that a hash
of the run directory and the role's name picks in `FIRST_UID` to `FIRST_UID + COUNT - 1`,
the next free one if that is taken: the same uid at every start, so that what the role
wrote in its local resources stays its own. Taken means named in the user or group
database, or held by another controller: each holds a lock on
`/run/rolehost/uids/UID.lock` for each of its roles while it lives (the kernel drops the
locks with the process, so a killed controller leaves none).

The range is in what systemd leaves unused (65536 to 524287): below it are regular and
system users, and systemd's own DynamicUser range (61184 to 65519); above, the ranges
given to containers. These uids have no name: a tool that asks the user database for the
current user's name (`whoami`) finds none. `USER`, `LOGNAME` and `HOME` are set instead.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import hashlib
import os
import pwd
from pathlib import Path

from rolehost.processes.users import User

FIRST_UID = 0x50000  # 327680
COUNT = 0x10000  # 65536 uids: up to 393215
LOCKS = Path("/run/rolehost/uids")


class NoFreeUid(Exception):
    """Every uid of the range is named or held by another controller."""


def _named(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        try:
            grp.getgrgid(uid)
        except KeyError:
            return False
    return True


def _hold(uid: int) -> int | None:
    """A descriptor holding the lock on `uid`, or None if another process holds it."""
    LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(LOCKS / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        raise
    return fd


class Identities:
    """The users of the roles of one run directory, each allocated on first use and held
    as long as this process lives."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir.resolve()
        self._users: dict[str, User] = {}
        self._locks: list[int] = []  # never closed: the locks go with the process

    def user_of(self, role: str) -> User:
        if (user := self._users.get(role)) is None:
            user = self._users[role] = self._allocate(role)
        return user

    def _allocate(self, role: str) -> User:
        seed = hashlib.sha256(f"{self.run_dir}\0{role}".encode()).digest()
        start = int.from_bytes(seed[:4], "big") % COUNT
        mine = {u.uid for u in self._users.values()}
        for step in range(COUNT):
            uid = FIRST_UID + (start + step) % COUNT
            if uid in mine or _named(uid):
                continue
            if (fd := _hold(uid)) is not None:
                self._locks.append(fd)
                # "": the probe of decide(), which speaks for every allocated uid
                return User(f"rolehost-{role}"[:32] if role else f"uid {uid} (allocated)",
                            uid, uid)
        raise NoFreeUid(f"no free uid from {FIRST_UID} to {FIRST_UID + COUNT - 1} for role "
                        f"{role}")
