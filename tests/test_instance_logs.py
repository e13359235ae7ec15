"""Instance logs: each line stamped with its time and stream, as text or JSON lines, and
`rolehost logs` reading both."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rolehost.observability.output import MAX_PARTIAL, OutputLog
from rolehost.testing import wait_until
from support.service import MakeService

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(rf"({STAMP}) (stdout|stderr|task \d+|rolehost) \| (.*)")

# Each stream of the host and of a startup task; a stdout line that comes in two pieces
# with a whole stderr line read in between; a last line without its newline.
ROLE = """
class Role(RoleEntryPoint):
    def on_start(self):
        print("to stdout", flush=True)
        print('say "hi" in café', flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        sys.stdout.write("begun, ")
        sys.stdout.flush()
        print("between", file=sys.stderr, flush=True)
        hold = RoleEnvironment.get_setting("probe") + ".hold"
        while os.path.exists(hold):  # until the test has seen `between` in the log
            time.sleep(0.02)
        print("ended", flush=True)
        return True

    def on_stop(self):
        sys.stdout.write("last words")
        sys.stdout.flush()
"""
TASK = """
[[roles.web.startup_tasks]]
command = ["sh", "-c", "echo task says; echo task complains >&2"]
"""
# By stream: across the host's two, the order is the order the controller read them in.
EXPECTED = {"task 1": ["task says", "task complains"],
            "stdout": ["to stdout", 'say "hi" in café', "begun, ended", "last words"],
            "stderr": ["to stderr", "between"]}


def entries(path: Path, form: str) -> list[tuple[str, str, str]]:
    """(time, stream, line) of each line of an instance log, checking its form."""
    found = []
    for raw in path.read_text().splitlines():
        if form == "json":
            entry = json.loads(raw)
            assert list(entry) == ["time", "stream", "instance", "line"], raw[:200]
            assert entry["instance"] == "web_IN_0", raw[:200]
            assert re.fullmatch(STAMP, entry["time"]), raw[:200]
            found.append((entry["time"], entry["stream"], entry["line"]))
        else:
            match = TEXT_LINE.fullmatch(raw)
            assert match, raw[:200]
            found.append((match[1], match[2], match[3]))
    return found


@pytest.mark.parametrize("form", ["text", "json"])
def test_each_line_is_stamped_with_its_time_and_stream(make_service: MakeService,
                                                       form: str) -> None:
    chosen = {"instance_log_format": form} if form == "json" else {}  # text: the default
    service = make_service(ROLE, service=chosen, extra=TASK)
    hold = Path(f"{service.probe}.hold")
    hold.touch()
    with service.harness() as h:
        try:
            # Not before the stderr line after it: the first half of the stdout line
            # waits for the rest, on its own stream.
            wait_until(lambda: "between" in h.logs("web/0"), 30, "the line between",
                       lambda: h.logs("web/0"))
            assert "begun" not in h.logs("web/0")
        finally:
            hold.unlink()  # else on_start holds the stop for stop_timeout
        h.wait_ready(30)
        h.stop()
        log = h.run_dir.instance_log("web_IN_0")
        found = entries(log, form)
        assert {s: [line for _, stream, line in found if stream == s] for s in EXPECTED} == (
            EXPECTED)
        order = [(stream, line) for _, stream, line in found]
        assert len(order) == 8 and {s for s, _ in order[:2]} == {"task 1"}  # tasks first
        assert order.index(("stderr", "between")) < order.index(("stdout", "begun, ended"))
        assert [when for when, _, _ in found] == sorted(when for when, _, _ in found)
        # `rolehost logs` prints either form as the text form.
        rendered = [f"{when} {stream} | {line}" for when, stream, line in found]
        shown = subprocess.run(
            [sys.executable, "-m", "rolehost", "logs", "web/0", "-n", "3",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == rendered[-3:]
        assert h.logs("web/0").splitlines() == rendered


LONG = """
class Role(RoleEntryPoint):
    def run(self):
        sys.stdout.write("x" * 200 * 1024)  # and no newline
        sys.stdout.flush()
        RoleEnvironment.wait_for_stop()
"""


def test_a_line_that_does_not_end_is_written_in_pieces(make_service: MakeService) -> None:
    """The controller holds at most MAX_PARTIAL (and one read) of a line, however long."""
    service = make_service(LONG)
    with service.harness() as h:
        h.wait_ready(30)
        log = h.run_dir.instance_log("web_IN_0")

        def pieces() -> list[str]:
            return [line for _, stream, line in entries(log, "text") if stream == "stdout"]

        wait_until(lambda: len(pieces()) == 3, 30, "three pieces of the line",
                   lambda: str([len(p) for p in pieces()]))
        assert h.instance("web/0")["state"] == "ready"  # written while the host runs
        for piece in pieces():
            assert set(piece) == {"x"} and MAX_PARTIAL <= len(piece) < 2 * MAX_PARTIAL
        h.stop()
        assert sum(len(p) for p in pieces()) == 200 * 1024  # the rest, at the host's exit


def test_rotation_keeps_whole_stamped_lines(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "web_IN_0.log", "web_IN_0", max_bytes=2000)
    for n in range(100):
        log.write("stdout", f"line {n:03d}, in two ".encode())
        log.write("stdout", b"pieces\nand the next ")
        log.write("stderr", f"err {n:03d}\n".encode())
    log.close()  # the last partial line is written as it is
    files = [tmp_path / f"web_IN_0.log{suffix}" for suffix in (".3", ".2", ".1", "")]
    assert sorted(tmp_path.iterdir()) == sorted(files)  # oldest first, below
    lines = []
    for f in files:
        assert f.stat().st_size <= 2000
        lines += [TEXT_LINE.fullmatch(line) for line in f.read_text().splitlines()]
    assert all(lines)
    texts = [(m[2], m[3]) for m in lines if m]
    assert texts[-3:] == [("stdout", "and the next line 099, in two pieces"),
                          ("stderr", "err 099"), ("stdout", "and the next ")]


def test_logs_of_an_older_rolehost_are_shown_as_they_are(tmp_path: Path) -> None:
    """A log written before lines were stamped, or a line in neither form."""
    from rolehost.observability.output import render

    assert render("hello") == "hello"
    assert render('{"not": "an entry"}') == '{"not": "an entry"}'
    assert render('{"time": "T", "stream": "stderr", "instance": "w", "line": "x"}') == (
        "T stderr | x")
