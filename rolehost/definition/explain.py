"""Pydantic's validation errors told as rolehost's: one `DefinitionError` per key path,
the path as the user wrote it (`roles.web.endpoints.http.port`), the message in the
model's words, a guess for a misspelt key, and never a setting's value (it may be a
secret's)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rolehost.definition.errors import DefinitionError


def explain(errors: list[Any], file: Path | None, root: type[BaseModel]
            ) -> list[DefinitionError]:
    """`errors` (pydantic's, validating `root`) as rolehost's, one per key path."""
    return _merge([_explain(e, file, root) for e in errors])


def _explain(error: Any, file: Path | None, root: type[BaseModel]) -> DefinitionError:
    loc = tuple(error["loc"])
    if len(loc) >= 4 and loc[0] == "roles" and loc[2] == "settings":
        # Whatever the union member said, one message for the setting: what it may be.
        # (No "got": the value may be a secret's.)
        return DefinitionError(
            file, f"roles.{loc[1]}.settings.{loc[3]}",
            "expected a string, number or boolean, or a table { value = ..., secret = true }",
        )
    # Pydantic appends the failing union member or a "[key]" marker; they are noise.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _fields_at(root, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = (
            f"; did you mean {guess[0]!r}?" if guess else f"; expected one of: {', '.join(known)}"
        )
        return DefinitionError(file, path, f"unknown key{hint}")
    if kind == "missing":
        return DefinitionError(file, path, "required key is missing")
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), DefinitionError):
        # A model's own rule names the key below that model; `loc` says where the model is.
        inner: DefinitionError = error["ctx"]["error"]
        return DefinitionError(file, ".".join(p for p in (path, inner.path) if p), inner.message)
    message = str(error["msg"]).removeprefix("Value error, ")
    # "expected an integer, got '8080'": a type, with its article.
    message = re.sub(r"^Input should be a valid (\w+)", lambda m: "expected " + (
        "an " if m.group(1)[0] in "aeiou" else "a ") + m.group(1), message)
    message = re.sub(r"^Input should be ", "expected ", message)
    if kind == "path_type":
        message = "expected a path (a string)"
    message = re.sub(r"^String should (have|match) ", lambda m: "expected a string " + (
        "of " if m.group(1) == "have" else "matching "), message)
    if "input" in error and kind not in ("value_error",) and not isinstance(error["input"], dict):
        message += f", got {error['input']!r}"
    return DefinitionError(file, path, message)


def _merge(errors: list[DefinitionError]) -> list[DefinitionError]:
    """One error per key path: a union's members each complain about the same value."""
    by_path: dict[str, list[DefinitionError]] = {}
    for error in errors:
        by_path.setdefault(error.path, []).append(error)
    merged = []
    for path, group in by_path.items():
        if len({e.message for e in group}) == 1:
            merged.append(group[0])
            continue
        kinds = [m.group(1) for e in group
                 if (m := re.match(r"expected ((?:an? )?\w+)", e.message))]
        got = group[0].message.rpartition(", got ")[2]
        message = f"expected {' or '.join(kinds)}, got {got}"
        merged.append(DefinitionError(group[0].file, path, message))
    return merged


_UNION_TAGS = {"str", "list[str]", "int", "float", "bool", "function-after", "function-before"}


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys the model accepts at `loc` (for "did you mean")."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:  # a dict key such as a role or endpoint name
            continue
        model = _model_of(field.annotation)
    return sorted(model.model_fields) if model is not None else []


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
