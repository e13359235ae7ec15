"""A translated document written as a rolehost.toml a person reads and finishes: tables
in the order of the definition, small tables inline, and each note as a comment on its
key. tomlkit writes it: the standard library reads TOML but does not write it."""

from __future__ import annotations

from typing import Any

import tomlkit
from tomlkit.items import AoT, InlineTable, Item, Table

# Small tables read best on one line, beside the key they belong to.
INLINE = frozenset({"probe", "env"})


def render(document: dict[str, Any], comments: dict[tuple[str, ...], str],
           header: list[str]) -> str:
    out = tomlkit.document()
    for line in header:
        out.add(tomlkit.comment(line))
    out.add(tomlkit.nl())
    for key, value in document.items():
        out.add(key, _item(value, (key,), comments))
    return tomlkit.dumps(out)


def _inline(keys: tuple[str, ...]) -> bool:
    return keys[-1] in INLINE or (len(keys) > 1 and keys[-2] == "settings")


def _item(value: Any, keys: tuple[str, ...], comments: dict[tuple[str, ...], str]) -> Item:
    item: Item
    if isinstance(value, dict) and _inline(keys):
        inline: InlineTable = tomlkit.inline_table()
        inline.update(value)
        item = inline
    elif isinstance(value, dict):
        # A table of tables only: its own header would be an empty line of noise.
        table: Table = tomlkit.table(is_super_table=bool(value) and all(
            isinstance(v, dict) and not _inline((*keys, k)) for k, v in value.items()))
        for key, child in value.items():
            table.add(key, _item(child, (*keys, key), comments))
        item = table
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        tables: AoT = tomlkit.aot()
        for number, child in enumerate(value):
            tables.append(_item(child, (*keys, str(number)), comments))
        item = tables
    else:
        item = tomlkit.item(value)
    if keys in comments:
        item.comment(comments[keys])
    return item
