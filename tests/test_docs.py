"""The reference pages are generated from the code; the committed ones must match it."""

from __future__ import annotations

import importlib.util
import re
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


def test_the_design_map_names_every_module() -> None:
    """docs/design.md's tree is the maintainers' map: a module added without it (or one
    removed and still named) makes the map lie, as two merges once did."""
    design = (DOCS / "design.md").read_text()
    tree = design[design.index("```\nrolehost/\n"):]
    tree = tree[:tree.index("\n```", 4)]
    by_package: dict[str, set[str]] = {}
    package = ""
    for line in tree.splitlines()[2:]:
        head = line.lstrip("│├└─ ")
        if line.startswith(("├", "└")):
            first = head.split()[0]
            package = first.rstrip("/") if first.endswith("/") else ""
        by_package.setdefault(package, set()).update(re.findall(r"\w+", head))
    root = Path(__file__).parent.parent / "rolehost"
    missing = []
    for module in root.rglob("*.py"):
        parts = module.relative_to(root).parts
        name = module.stem
        if name.startswith("__") or parts[0] in ("testing", "cli") or len(parts) > 2:
            continue
        where = parts[0] if len(parts) == 2 else ""
        if name not in by_package.get(where, set()):
            missing.append("/".join(parts))
    assert not missing, f"docs/design.md's tree does not name: {missing}"


def test_the_cli_page_does_not_depend_on_what_ran_before() -> None:
    """click caches each command's help option from the first context that asks: the
    page once lacked `-h` where the process had not run those commands yet, and the
    check above failed or passed by the order of the tests in its worker."""
    from click.testing import CliRunner

    from rolehost.cli import cli
    from rolehost.definition import reference

    before = reference.cli_reference(cli)
    assert CliRunner().invoke(cli, ["scale", "-h"]).exit_code == 0
    assert reference.cli_reference(cli) == before
    assert before.count("-h, --help") == before.count("## `rolehost ") + 1
