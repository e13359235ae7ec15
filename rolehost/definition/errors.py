"""A definition that cannot be used: the errors every reader of `rolehost.toml` raises,
each naming the file and the key path. A module of its own, so that the model's parts
(endpoints.py, site.py) raise them without importing the model."""

from __future__ import annotations

from pathlib import Path


class DefinitionError(ValueError):
    """A definition that cannot be used. `str()` names the file and the key path."""

    def __init__(self, file: Path | None, path: str, message: str) -> None:
        self.file, self.path, self.message = file, path, message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(str(p) for p in (self.file, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


class DefinitionErrors(ValueError):
    """Every problem found in one definition, each a `DefinitionError`."""

    def __init__(self, errors: list[DefinitionError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))
