"""The history of operations is read line by line, each line checked whole: a bad line is
skipped and counted, and never costs the good ones, `ops` or a start (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rolehost.testing import run_dir_processes
from support.cli import rolehost
from support.roles import IDLE
from support.service import MakeService


def _line(id: str, **fields: object) -> str:
    operation = {"kind": "restart", "arguments": {"cause": "test"}, "id": id,
                 "started": 1796640868.0, "ended": 1796640869.5, "outcome": "succeeded",
                 "error": None, "instances": ["web_IN_0"], **fields}
    return json.dumps(operation)


GOOD = [_line("good0001"), _line("good0002", outcome="failed", error="boom"),
        _line("good0003", started=1796640870, ended=None, outcome="running")]
BAD = [
    _line("bad00001", started="1796640868"),
    _line("bad00002", started=None),
    _line("bad00003").replace("1796640868.0", "1e400"),
    _line("bad00004", instances=None),
    _line("bad00005", arguments={"instances": float("inf")}),  # json writes Infinity
    _line("bad00006", ended=float("nan")),
    _line("bad00007", kind=["restart"]),
    "[" * 100_000 + "]" * 100_000,
    '{"kind": "restart", "arguments": {}, "id": "cut',  # cut short by a crash
]


def _strict(text: str) -> object:
    def refuse(constant: str) -> object:
        pytest.fail(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_bad_history_lines_are_skipped_and_counted(make_service: MakeService,
                                                   tmp_path: Path) -> None:
    make_service(IDLE, role={"stop_timeout": "2s"})
    run_dir = tmp_path / ".rolehost"
    run_dir.mkdir(mode=0o700)
    history = run_dir / "history.jsonl"
    # Good and bad lines interleaved: the good ones after a bad one are read too.
    lines = [*BAD[:2], GOOD[0], BAD[2], GOOD[1], *BAD[3:-1], GOOD[2], BAD[-1]]
    history.write_text("\n".join(lines) + "\n")
    skipped = len(BAD)
    warning = (f"rolehost: warning: {skipped} line(s) of {run_dir / 'history.jsonl'} "
               "are not an operation's and were skipped")

    # No controller: read from the file, which is left as it is.
    listed = rolehost("ops", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert warning in listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[:-1]] == [
        "good0001", "good0002", "good0003"]
    as_json = rolehost("ops", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    answer = _strict(as_json.stdout)
    assert isinstance(answer, dict)
    assert [o["id"] for o in answer["operations"]] == ["good0001", "good0002", "good0003"]
    assert answer["skipped_lines"] == skipped

    # A start reads it too: the deep line used to end it with a RecursionError.
    started = rolehost("start", "--detach", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        listed = rolehost("ops", "--json", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert warning in listed.stderr
        operations = {o["id"]: o for o in _strict(listed.stdout)["operations"]}  # type: ignore[index]
        assert operations["good0003"]["outcome"] == "interrupted"  # it never ended
        assert sorted(operations) == ["good0001", "good0002", "good0003"]
        events = [json.loads(line) for line in
                  (run_dir / "logs" / "controller.log").read_text().splitlines()]
        [warned] = [e for e in events if e["event"] == "history_lines_skipped"]
        assert warned["count"] == skipped
    finally:
        rolehost("stop", cwd=tmp_path)
        for proc in run_dir_processes(run_dir):
            proc.kill()
