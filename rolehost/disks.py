"""An instance's folders: `resources/NAME/` (C:), `os/` (D:) and `app/` (E:).

See the disk table in docs/concepts.md for what each maintenance event keeps.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rolehost.definition import Role

# Never part of a deployed app: version control, environments, caches, run directories.
_NOT_DEPLOYED = {".git", ".hg", ".venv", "venv", "__pycache__", ".rolehost", ".pytest_cache",
                 ".mypy_cache", ".ruff_cache", "node_modules"}


@dataclass(frozen=True)
class Disks:
    root: Path

    @property
    def resources(self) -> Path:
        return self.root / "resources"

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
        """Make every folder that does not exist yet; existing content is kept."""
        for folder in (self.tmp, self.app, *(self.resource(n) for n in role.local_resources)):
            folder.mkdir(parents=True, exist_ok=True)

    def deploy(self, source: Path, run_dir: Path) -> None:
        """Replace `app/` with a fresh copy of the role's app folder."""
        run_dir = run_dir.resolve()

        def ignore(folder: str, names: list[str]) -> set[str]:
            return {
                n for n in names
                if n in _NOT_DEPLOYED or (Path(folder) / n).resolve() == run_dir
            }

        wipe(self.app)
        shutil.copytree(source, self.app, ignore=ignore, symlinks=True, dirs_exist_ok=True)

    def clean_resources(self, role: Role, only_clean_on_recycle: bool) -> None:
        for name, spec in role.local_resources.items():
            if spec.clean_on_recycle or not only_clean_on_recycle:
                wipe(self.resource(name))


def wipe(folder: Path) -> None:
    """Empty `folder` (creating it if missing), keeping the folder itself."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
