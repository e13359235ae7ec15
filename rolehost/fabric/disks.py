"""An instance's folders, and what each maintenance event does to them.

| folder            | platform drive | holds                                   |
| `resources/NAME/` | C:             | declared local storage                  |
| `os/`             | D:             | temp, installed tools, machine state    |
| `app/`            | E:/F: approot  | a copy of the deployed role code        |

`Maintenance` and `apply` are the disk table of docs/concepts.md#disks, in code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads Maintenance and Upgrade without importing the model
    from rolehost.definition import Role
    from rolehost.processes.users import User

# Never part of a deployed app: version control, environments, caches, run directories
# (`.rolehost`, and run-instance's `.rolehost-ROLE-INDEX`, by prefix).
_NOT_DEPLOYED = {".git", ".hg", ".venv", "venv", "__pycache__", ".rolehost", ".pytest_cache",
                 ".mypy_cache", ".ruff_cache", "node_modules"}


@dataclass(frozen=True)
class Disks:
    root: Path
    # Elsewhere than root/resources: a persistent volume, in a container (run-instance).
    resources_root: Path | None = None
    owner: User | None = None  # a root controller's limited user: the folders are its own
    # Left out of app/ when the app folder is a source, not a package's copy (run-instance).
    definition: Path | None = None

    @property
    def resources(self) -> Path:
        return self.resources_root or self.root / "resources"

    @property
    def os(self) -> Path:
        return self.root / "os"

    @property
    def tmp(self) -> Path:
        return self.os / "tmp"

    @property
    def app(self) -> Path:
        return self.root / "app"

    def resource(self, name: str) -> Path:
        return self.resources / name

    def create(self, role: Role) -> None:
        """Make every folder that does not exist yet; existing content is kept.

        Under a root controller the limited user owns `os/` and each resource (0700: no
        other role's user may look in), but not the folders that hold them: it could
        otherwise put a link in their place, and the controller, which wipes and hands
        over these folders as root, would follow it anywhere on the machine. `app/` is
        handed over by `deploy`."""
        resources = [self.resource(n) for n in role.local_resources]
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.os, self.tmp, self.app, self.resources, *resources):
            _real_folder(folder)
        if self.owner is not None:
            for holder in (self.root, self.resources):
                os.chown(holder, os.geteuid(), os.getegid(), follow_symlinks=False)
                os.chmod(holder, 0o755)
            self.owner.give(self.os, self.tmp, *resources)
            for folder in (self.os, self.tmp, *resources):
                os.chmod(folder, 0o700, follow_symlinks=False)

    def deploy(self, source: Path, run_dir: Path, writable: bool = False) -> None:
        """Replace `app/` with a fresh copy of the role's app folder. A copy that fails (a
        full disk) leaves `app/` empty, so that the next boot, a recycle too, deploys it
        again rather than run half an app. Under a root controller the copy is the limited
        user's to read only (root's, in its group), or its own if `writable`."""
        wipe(self.app)
        try:
            copy_app(source, self.app, run_dir, self.definition)
        except OSError as exc:  # shutil.Error too: one (src, dst, why) per file that failed
            wipe(self.app)
            errors = exc.args[0] if isinstance(exc, shutil.Error) and exc.args else None
            why = str(errors[0][2]) if isinstance(errors, list) and errors else str(exc)
            raise OSError(f"cannot copy the app into {self.app}: {why}") from None
        if self.owner is not None and writable:
            self.owner.give_tree(self.app)
        elif self.owner is not None:
            self.owner.lend_tree(self.app)

    def discard(self) -> None:
        """Remove the instance's folders for good, as the platform deletes the VM of an
        instance that a scale-in removes: an instance that gets its index later is a new
        VM, with no local resources, no machine state and no task markers of the old one.
        A `resources_root` elsewhere (a persistent volume) is not the instance's to remove."""
        if self.root.is_symlink() or (self.root.exists() and not self.root.is_dir()):
            self.root.unlink()
        elif self.root.exists():
            shutil.rmtree(self.root)  # by descriptors: it follows no link inside the tree

    def clean_resources(self, role: Role, only_clean_on_recycle: bool) -> None:
        for name, spec in role.local_resources.items():
            if spec.clean_on_recycle or not only_clean_on_recycle:
                wipe(self.resource(name))


class Maintenance(StrEnum):
    """What begins a boot of an instance."""

    START = "start"  # the controller starts the instance: app/ deployed afresh
    RECYCLE = "recycle"  # a crash, on_start False, run returned, request_recycle, `recycle`
    RESTART = "restart"  # reboot, host-OS update
    REIMAGE = "reimage"  # guest-OS update
    REBUILD = "rebuild"
    AGENT_UPDATE = "agent-update"  # only the host process restarts
    DEPLOY = "deploy"  # in-place upgrade: app/ from a new version, every other disk kept

    @property
    def reruns_tasks(self) -> bool:
        return self is not Maintenance.AGENT_UPDATE


class Upgrade(StrEnum):
    """The platform's monthly updates, and the maintenance event each is per instance.
    Here, beside the events, and not with the walks that carry them out: the CLI offers
    the same choices without importing the supervisor."""

    HOST_OS = "host-os"
    GUEST_OS = "guest-os"
    AGENT = "agent"

    @property
    def event(self) -> Maintenance:
        return {Upgrade.HOST_OS: Maintenance.RESTART, Upgrade.GUEST_OS: Maintenance.REIMAGE,
                Upgrade.AGENT: Maintenance.AGENT_UPDATE}[self]


def apply(event: Maintenance, disks: Disks, role: Role, run_dir: Path) -> None:
    """Do to the instance's folders what `event` does to the platform's drives."""
    if event is Maintenance.AGENT_UPDATE:
        return
    if event is Maintenance.REBUILD:
        wipe(disks.resources)
    if event in (Maintenance.REIMAGE, Maintenance.REBUILD):
        wipe(disks.os)
    if event is not Maintenance.DEPLOY:
        disks.clean_resources(role, only_clean_on_recycle=True)
    disks.create(role)
    if event is not Maintenance.RECYCLE or not any(disks.app.iterdir()):
        disks.deploy(role.app, run_dir, role.app_writable)


def copy_app(source: Path, target: Path, run_dir: Path, definition: Path | None = None) -> None:
    """Copy an app folder, leaving out version control, environments, caches, the run
    directory and the definition file (the default app folder, ".", holds both: the
    definition's secrets reach the role as settings, never as a file it can read)."""
    shutil.copytree(source, target, ignore=_not_deployed(run_dir, definition), symlinks=True,
                    dirs_exist_ok=True)


def app_files(source: Path, run_dir: Path, definition: Path | None = None) -> list[Path]:
    """What `copy_app` copies of `source`, relative to it and sorted: files, and links
    (copied as links). A package's digest covers exactly these, so that what the copy
    leaves out (a run directory in the app folder, logs growing) makes no new version."""
    ignore = _not_deployed(run_dir, definition)
    found = []
    for folder, dirs, files in os.walk(source):
        left_out = ignore(folder, [*dirs, *files])
        kept = [n for n in dirs if n not in left_out]
        dirs[:] = [n for n in kept if not os.path.islink(os.path.join(folder, n))]
        links = [n for n in kept if n not in dirs]
        for name in [*links, *(n for n in files if n not in left_out)]:
            found.append(Path(folder, name).relative_to(source))
    return sorted(found)


def _not_deployed(run_dir: Path,
                  definition: Path | None = None) -> Callable[[str, list[str]], set[str]]:
    left_out = {run_dir.resolve(), *([definition.resolve()] if definition else [])}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _NOT_DEPLOYED or n.startswith(".rolehost-")
                or (Path(folder) / n).resolve() in left_out}

    return ignore


def usage_mb(folder: Path) -> float:
    """Bytes under `folder`, in MiB (files only, links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total / (1024 * 1024)


def wipe(folder: Path) -> None:
    """Empty `folder` (creating it if missing), keeping the folder itself. A link in its
    place is removed, never followed."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)  # by descriptors: it follows no link inside the tree
    folder.mkdir(parents=True, exist_ok=True)


def _real_folder(folder: Path) -> None:
    """`folder` as a folder of its own: a link or file in its place is removed."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def write_inside(folder: Path, relative: str, text: str) -> None:
    """Write `folder/relative` as the controller, in a folder the limited user owns: each
    step is opened from the one before without following a link (a link the user put in
    the way, to make root write elsewhere, is removed), and `folder` itself is one the
    user cannot replace (`Disks.create`)."""
    *folders, name = relative.split("/")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for step in folders:
            with contextlib.suppress(FileExistsError):
                os.mkdir(step, 0o755, dir_fd=fd)
            try:
                inner = os.open(step, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:  # ELOOP: a link; ENOTDIR: a file
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                os.unlink(step, dir_fd=fd)
                os.mkdir(step, 0o755, dir_fd=fd)
                inner = os.open(step, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                      dir_fd=fd)
        with os.fdopen(out, "w") as file:
            file.write(text)
    finally:
        os.close(fd)
