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
