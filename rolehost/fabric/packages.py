"""The package store: the versions of a service, and what every instance runs.

A package is the definition as it was (kept verbatim) and a copy of each role's app
folder, under `RUN_DIR/packages/VERSION/`. Loading one points each role's `app` at its
copy. `rolehost start` packages the definition it is given and runs that package, so
a restart, a reimage or a rollback re-deploys what was deployed, never the working
tree the user is editing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rolehost import definition as model
from rolehost.fabric.disks import app_files, copy_app
from rolehost.fabric.errors import Conflict, DoesNotLoad, Invalid, NotFound

# The whole name, to its last character: `$` would let a final newline through.
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def version_name(name: str) -> str:
    """`name` if it may name a package, else Invalid: the one check of every version
    name given, whether to make a package or to load one. A name is a folder of the
    store and nothing else: no separator, no `..`, no absolute path (`deploy /tmp/x`
    loaded from outside the store, and failed every restart once that folder went)."""
    if not isinstance(name, str) or _VERSION.fullmatch(name) is None:
        raise Invalid(f"not a version name: {name!r} (up to 64 letters, digits, . _ -, "
                      "beginning with a letter or a digit)")
    return name


class Packages:
    def __init__(self, root: Path, run_dir: Path) -> None:
        self.root, self.run_dir = root, run_dir

    def create(self, source: Path, version: str | None) -> dict[str, Any]:
        """Snapshot `source` (a definition file) and its roles' app folders."""
        try:
            definition = model.load(source)
        except model.DefinitionErrors as exc:
            raise Invalid(f"invalid definition:\n{exc}") from None
        digest = _digest(source, definition, self.run_dir)
        version = version_name(version or digest[:12])
        target = self.root / version
        if target.exists():
            existing = json.loads((target / "package.json").read_text())
            if existing["digest"] == digest:
                _private(target)  # a store from before its folders were all 0700
                return dict(existing)  # the same content: packaging it again changes nothing
            raise Conflict(f"version {version} exists already, with other content")
        # The roles' source and the definition, secrets and all: the controller's alone.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        staging = self.root / f".{version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "apps").mkdir(mode=0o700, parents=True)
        shutil.copy2(source, staging / "rolehost.toml")
        for name, role in definition.roles.items():
            copy_app(role.app, staging / "apps" / name, self.run_dir, source)
        _private(staging)
        info = {"version": version, "created": time.time(), "digest": digest,
                "source": str(source.resolve()), "roles": sorted(definition.roles)}
        (staging / "package.json").write_text(json.dumps(info, indent=2))
        staging.rename(target)  # a package is whole, or not there
        return info

    def _folder(self, version: str) -> Path:
        """The store's folder of `version`: never a link out of the store, either."""
        folder = self.root / version_name(version)
        if folder.is_symlink():
            raise Invalid(f"package {version} is a link out of the store ({folder}): "
                          "packages are made with `rolehost package`")
        return folder

    def list(self) -> list[dict[str, Any]]:
        if not self.root.exists():
            return []
        found = []
        for info in sorted(self.root.glob("*/package.json")):
            try:
                found.append(json.loads(info.read_text()))
            except ValueError:
                continue
        return sorted(found, key=lambda p: p["created"])

    def load(self, version: str) -> model.Definition:
        """The package's definition, its roles' apps pointing at the package's copies."""
        folder = self._folder(version)
        if not (folder / "package.json").exists():
            known = ", ".join(p["version"] for p in self.list()) or "none"
            raise NotFound(f"no package {version!r} (available: {known}; "
                           "make one with `rolehost package`)")
        # Its relative paths are from the definition it was made of: certificates are
        # not packaged, but read where the definition names them (renewed there).
        source = Path(json.loads((folder / "package.json").read_text())["source"])
        try:
            definition = model.load(folder / "rolehost.toml", base=source.parent)
        except model.DefinitionErrors as exc:
            raise DoesNotLoad(f"package {version} has an invalid definition:\n{exc}") from None
        roles = {name: role.model_copy(update={"app": folder / "apps" / name})
                 for name, role in definition.roles.items()}
        return definition.model_copy(update={"roles": roles})

    def source_apps(self, version: str) -> dict[str, Path]:
        """Each role's app folder as the package's definition named it where it was
        made (`load` points them at the copies instead)."""
        import tomllib

        folder = self._folder(version)
        source = Path(json.loads((folder / "package.json").read_text())["source"])
        raw = tomllib.loads((folder / "rolehost.toml").read_text(encoding="utf-8"))
        return {name: role.app for name, role in model.parse(raw, source).roles.items()}


def compatibility(running: model.Definition, new: model.Definition) -> list[str]:
    """What keeps `new` from replacing `running` in place (empty: nothing). Instance
    counts do not: a package carries its own, as a .cscfg does, and the deploy scales to
    them."""
    problems = []
    if running.service != new.service:  # each key with both values, as for the roles
        problems += [f"service.{k} differs ({getattr(running.service, k)!r} running, "
                     f"{getattr(new.service, k)!r} in the package)"
                     for k in type(running.service).model_fields
                     if getattr(running.service, k) != getattr(new.service, k)]
    if set(running.roles) != set(new.roles):
        problems.append(f"roles differ ({', '.join(sorted(running.roles))} running, "
                        f"{', '.join(sorted(new.roles))} in the package)")
    for name in set(running.roles) & set(new.roles):
        old, fresh = running.roles[name], new.roles[name]
        # Each instance keeps its ports through a deploy, and other instances know them. The
        # staging ports are the staging slot's, which an in-place deploy leaves alone.
        problems += [f"roles.{name}.{kind} differ" for kind in model.ENDPOINT_KINDS
                     if _unstaged(getattr(old, kind)) != _unstaged(getattr(fresh, kind))]
    return problems


def _private(package: Path) -> None:
    """A package's folders 0700 and its definition 0600, whatever the modes of their
    sources (the files of the apps keep theirs: a script stays executable). The store is
    0700 already; this holds if its folder is ever opened, or a package is copied out."""
    for folder, _, _ in os.walk(package):
        os.chmod(folder, 0o700)
    os.chmod(package / "rolehost.toml", 0o600)


def _unstaged(endpoints: dict[str, Any]) -> dict[str, Any]:
    """Endpoints without their staging ports (input endpoints have one; others do not)."""
    return {name: ep.model_copy(update={"staging_port": None}) if hasattr(ep, "staging_port")
            else ep for name, ep in endpoints.items()}


def _digest(source: Path, definition: model.Definition, run_dir: Path) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for name, role in sorted(definition.roles.items()):
        for relative in app_files(role.app, run_dir, source):
            path = role.app / relative
            digest.update(f"{name}:{relative}".encode())
            # A link is copied as a link: what it points at is not part of the package.
            digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return digest.hexdigest()
