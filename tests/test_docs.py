"""The reference pages are generated from the code; the committed ones must match it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"


def _pages() -> dict[str, object]:
    spec = importlib.util.spec_from_file_location("generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PAGES  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(_pages()))
def test_generated_page_is_current(name: str) -> None:
    render = _pages()[name]
    assert (DOCS / name).read_text() == render(), (  # type: ignore[operator]
        f"docs/{name} is stale: run `python docs/generate.py`"
    )


def test_the_reference_has_every_table_and_key_of_the_model() -> None:
    """The reference walks the model: a table or a key added to it is in the page, where
    a list of sections written by hand in reference.py had to be kept in step."""
    from rolehost import definition
    from rolehost.definition import reference

    page = reference.configuration()
    schema = definition.json_schema()
    objects = {name for name, d in schema["$defs"].items() if "properties" in d}
    sections = dict(reference._sections(definition.Definition, ""))
    # Secret is a setting's value written as a table, described with the settings.
    assert {cls.__name__ for cls in sections.values()} == objects - {"Secret"}
    for title, cls in sections.items():
        part = page.split(f"## `{title}`\n", 1)[1].split("\n## ", 1)[0]
        base = title.strip("[]")
        for key in schema["$defs"][cls.__name__]["properties"]:
            own_section = {f"{base}.{key}", f"{base}.{key}.NAME"} & {
                t.strip("[]") for t in sections}
            assert f"| `{key}` |" in part or f".{key}]` is a table of" in part \
                or own_section, (title, key)
