"""How tests/transcripts.py compares a doc's transcript with a real run, and rewrites it."""

from __future__ import annotations

import transcripts
from transcripts import Step


def masked(text: str, paths: dict[str, str] | None = None) -> list[str]:
    return [transcripts.mask(line, paths or {}) for line in text.strip("\n").splitlines()]


def test_volatile_fields_are_masked() -> None:
    doc = masked("""
06:00:08 rolehost | controller started pid=27268 limited_user=nobody relay=compiled
06:00:08 rolehost | version=cc6b9c96888f deployment=47c60f4611424361b01ab1554ad82fb8
06:00:08 rolehost | run_dir=/tmp/tutorial/.rolehost
worker_IN_0  0   ready  27351  0         06:00:15
27292 27268 /tmp/v/bin/python3 -P -m rolehost.host
  start    ready in 0.13s
2026-12-07T12:44:04.371Z stdout | tick 1: hello from rolehost
""")
    run = masked("""
12:12:43 rolehost | controller started pid=4 limited_user=root relay=interpreted
12:12:43 rolehost | version=0123456789ab deployment=afa0b7b8defd4be8bd4f16b3b93c72cd
12:12:43 rolehost | run_dir=/tmp/pytest-7/x/tutorial/.rolehost
worker_IN_0  0   ready  512    0         12:12:49
  512     4 /srv/.venv/bin/python -P -m rolehost.host
  start    ready in 0.07s
2026-12-08T01:02:03.004Z stdout | tick 1: hello from rolehost
""", {"/tmp/pytest-7/x/tutorial": "/tmp/tutorial"})
    assert doc == run


def test_what_is_not_volatile_is_compared() -> None:
    assert masked("worker_IN_0  0   ready  27351  0  06:00:15") != masked(
        "worker_IN_0  0   ready  27351  1  06:00:15")  # RESTARTS
    assert masked("next try in 1s") != masked("next try in 2s")  # a back-off


def test_an_ellipsis_stands_for_any_run_of_lines_none_included() -> None:
    doc = ["a", "...", "d"]
    assert transcripts.match(doc, ["a", "b", "c", "d"])
    assert transcripts.match(doc, ["a", "d"])
    assert not transcripts.match(doc, ["a", "b", "c"])
    assert not transcripts.match(doc, ["x", "a", "d"])  # the doc's first line is the first
    assert transcripts.match(["...", "d"], ["a", "d"])
    assert transcripts.match(["a", "..."], ["a"])
    assert transcripts.match(["a", "...", "c", "...", "e"], ["a", "c", "c", "e"])
    assert not transcripts.match(["a", "...", "c", "...", "e"], ["a", "e"])


def test_streams_interleave_freely_and_keep_their_own_order() -> None:
    doc = masked("""
06:00:08 rolehost | controller started
06:00:08 worker_IN_0 | warming up
06:00:08 rolehost | worker_IN_0: starting -> ready
06:00:08 worker_IN_1 | warming up
06:00:08 rolehost | worker_IN_1: starting -> ready
06:00:10 worker_IN_0 | tick 1
""")
    interleaved = masked("""
06:00:08 rolehost | controller started
06:00:08 rolehost | worker_IN_1: starting -> ready
06:00:08 rolehost | worker_IN_0: starting -> ready
06:00:08 worker_IN_0 | warming up
06:00:08 worker_IN_1 | warming up
06:00:10 worker_IN_0 | tick 1
""")
    assert transcripts.match(doc, interleaved)
    reordered = [*interleaved[:3], interleaved[5], interleaved[4], interleaved[3]]
    assert not transcripts.match(doc, reordered)  # worker_IN_0's tick before its warm-up


def test_a_line_about_no_instance_is_a_fixed_point() -> None:
    doc = masked("""
06:00:14 rolehost | controller stopping
06:00:14 rolehost | worker_IN_0: ready -> stopping
06:00:14 rolehost | controller stopped
""")
    assert not transcripts.match(doc, [doc[1], doc[0], doc[2]])
    assert not transcripts.match(doc, [doc[0], doc[2], doc[1]])


def test_a_block_parses_into_commands_and_renders_back() -> None:
    text = "$ rolehost check\nrolehost: invalid definition:\n$ echo $?\n2\n^C\nstopped\n"
    steps = transcripts.parse(text)
    assert steps == [Step("rolehost check", ["rolehost: invalid definition:"]),
                     Step("echo $?", ["2"]), Step("^C", ["stopped"])]
    assert transcripts.render(steps) == text


def test_a_comparison_names_the_block_and_the_command() -> None:
    shown = [Step("rolehost status", ["tutorial  deployment 6d0ec54fc7c3  controller pid 1"])]
    ran = [Step("rolehost status", ["tutorial  deployment 6d0ec54fc7c3  controller pid 2",
                                    "capacity: role worker: 2 instances"])]
    problem = transcripts.compare("status", shown, ran, {})
    assert problem.startswith("[status] $ rolehost status\n")
    assert "+capacity: role worker: 2 instances" in problem
    assert transcripts.compare("status", shown, [Step("rolehost status", ran[0].output[:1])],
                               {}) == ""


def test_lines_of_the_machine_are_left_out_of_the_run() -> None:
    shown = [Step("rolehost start", ["06:00:08 rolehost | controller started"])]
    ran = [Step("rolehost start", [
        "06:00:08 rolehost | [warning] limited user unavailable detail=...",
        "06:00:08 rolehost | controller started"])]
    assert transcripts.compare("start", shown, ran, {}) == ""


def test_regenerating_keeps_the_trims_and_shows_the_docs_paths() -> None:
    shown = [Step("rolehost logs", ["old first", "...", "old last"]),
             Step("pip install -e .", ["..."], run=False)]
    ran = [Step("rolehost logs", ["first /tmp/pytest-3/tutorial", "b", "c", "last"]),
           Step("pip install -e .", run=False)]
    again = transcripts.regenerate(shown, ran, {"/tmp/pytest-3/tutorial": "/tmp/tutorial"})
    assert again == [Step("rolehost logs", ["first /tmp/tutorial", "...", "last"]),
                     Step("pip install -e .", ["..."], run=False)]


def test_named_blocks_are_found_and_rewritten() -> None:
    page = ("intro\n<!-- transcript: one -->\n```console\n$ a\nold\n```\n"
            "```console\n$ unnamed\n```\n<!-- transcript: two -->\n```text\ntree\n```\n")
    assert transcripts.blocks(page) == {"one": ("console", "$ a\nold\n"), "two": ("text", "tree\n")}
    rewritten = transcripts.rewrite(page, {"one": "$ a\nnew\n"})
    assert rewritten == page.replace("old", "new")
