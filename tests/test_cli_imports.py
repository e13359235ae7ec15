"""`rolehost status` starts without the definition model (issue 23: at 500 instances the
CLI's own start, 0.5 s of importing pydantic and the fabric, was most of `status`'s time;
the controller's answer took 39 ms). What each command imports is checked in the
command's own process: the modules loaded once it has run, against a real controller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.roles import IDLE
from tests.support.service import MakeService

# Loaded by none of the commands that only ask the controller: the model (pydantic), the
# fabric's machinery, the logs' structlog (status --json), the event loop.
HEAVY = ("pydantic", "rolehost.definition", "rolehost.fabric.controller", "rolehost.balancer",
         "psutil", "asyncio")

RUN = """
import json, runpy, sys
sys.argv = ["rolehost", *sys.argv[1:]]
try:
    runpy.run_module("rolehost", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _loaded(*args: str) -> tuple[int, set[str], str]:
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          timeout=60)
    *_, last = done.stderr.strip().splitlines()
    report = json.loads(last)
    return report["code"], set(report["modules"]), done.stdout


def test_status_and_help_import_neither_the_model_nor_the_fabric(
        make_service: MakeService) -> None:
    svc = make_service(IDLE)
    with svc.harness() as h:
        h.wait_ready(30)  # the harness returns once the API answers, before the start
        run_dir = str(h.run_dir.path)
        code, modules, out = _loaded("status", "--json", "-f", str(svc.toml),
                                     "--run-dir", run_dir)
        assert code == 0 and json.loads(out)["instances"][0]["state"] == "ready"
        assert not {m for m in modules for heavy in (*HEAVY, "structlog")
                    if m == heavy or m.startswith(f"{heavy}.")}
        # The table needs the wording and the logs' clock: still no model, no fabric.
        code, modules, out = _loaded("status", "-f", str(svc.toml), "--run-dir", run_dir)
        assert code == 0 and "web_IN_0" in out
        assert not {m for m in modules for heavy in HEAVY
                    if m == heavy or m.startswith(f"{heavy}.")}
    code, modules, out = _loaded("--help")
    assert code == 0 and "status" in out and "scale" in out
    assert "pydantic" not in modules and "rolehost.definition" not in modules


def test_a_command_that_reads_the_definition_still_imports_it(tmp_path: Path) -> None:
    """The lazy imports are where the commands need them: `check` of a bad definition
    still names the file and the key, and exits 2."""
    bad = tmp_path / "rolehost.toml"
    bad.write_text('[service]\nname = "x"\n\n[roles.web]\nentry_point = "a:B"\ninstances = 0\n')
    code, modules, _ = _loaded("check", "-f", str(bad))
    assert code == 2 and "pydantic" in modules
