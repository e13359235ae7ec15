"""`rolehost check` passes the right pattern and names each seed bug at the step it shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def check(definition: str, scratch: Path) -> tuple[int, dict]:
    # A failed rehearsal keeps its scratch folder for inspection: in `scratch` (the
    # test's tmp_path, which pytest tidies), not among other runs' in /tmp.
    done = subprocess.run(
        [sys.executable, "-m", "rolehost", "check", "--json", "-f", definition],
        cwd=HERE, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    report = json.loads(done.stdout)
    assert Path(report["run_dir"]).parent == scratch
    return done.returncode, report


def test_the_right_pattern_passes_every_step(tmp_path: Path) -> None:
    code, report = check("rolehost.toml", tmp_path)
    assert code == 0 and report["ok"]
    steps = report["roles"]["tool"]
    assert [s["name"] for s in steps] == ["start", "restart", "reimage", "rebuild", "restart"]
    install = [s["tasks"][0]["state"] for s in steps]
    assert install == ["succeeded", "skipped", "succeeded", "succeeded", "skipped"]


def test_a_task_that_fails_on_its_second_run_is_caught_at_restart(tmp_path: Path) -> None:
    code, report = check("not-idempotent.toml", tmp_path)
    assert code == 1 and not report["ok"]
    start, restart = report["roles"]["tool"]
    assert start["ok"] and not restart["ok"]
    register = restart["tasks"][1]
    assert (register["state"], register["exit_code"]) == ("failed", 183)
    assert "duplicate entry" in restart["error"]
    assert "task 2 succeeded before and failed on its next run at restart" in restart["hints"][0]


def test_a_marker_that_outlives_its_effect_is_caught_at_reimage(tmp_path: Path) -> None:
    code, report = check("marker-on-wrong-disk.toml", tmp_path)
    assert code == 1
    steps = report["roles"]["tool"]
    assert [s["name"] for s in steps] == ["start", "restart", "reimage"]
    reimage = steps[2]
    assert reimage["tasks"][0]["state"] == "skipped"
    assert "greet is missing" in reimage["error"]
    assert 'use once_per = "image"' in reimage["hints"][0]

