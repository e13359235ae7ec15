"""Write the generated reference pages: python docs/generate.py"""

from pathlib import Path

from rolehost.cli import cli
from rolehost.definition import reference

HERE = Path(__file__).parent
PAGES = {
    "configuration.md": reference.configuration,
    "cli.md": lambda: reference.cli_reference(cli),
}

if __name__ == "__main__":
    for name, render in PAGES.items():
        (HERE / name).write_text(render())
        print(f"wrote docs/{name}")
