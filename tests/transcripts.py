"""Console transcripts in the docs, compared with real runs, and rewritten from them.

A transcript is a ```console block that a `<!-- transcript: NAME -->` line names: `$ COMMAND`
lines (or `^C`, for a Ctrl-C), each followed by what it printed. A test runs the commands
and compares (`compare`):

- volatile fields are masked on both sides (`MASKS`): times, pids, ids, versions,
  durations, the interpreter's and the package's paths, and the paths given per run;
- runs of blanks count as one (a table's columns move with the width of a pid);
- a `...` line in the doc matches any run of lines, none included;
- lines from different streams may interleave in any order, because the processes that
  print them run side by side: each instance's output (`worker_IN_0 | ...` on a
  controller's console), and the controller's events about each instance, keep their
  own order only. Lines about no instance (`controller started`) are fixed points that
  everything keeps its side of;
- lines that depend on the machine rather than on rolehost are dropped from the real
  output first (`MACHINE_LINES`).

`regenerate` writes a run's output back into a block (see tests/test_getting_started.py,
`--update-transcripts`), keeping the block's `...` trims: the lines before the first
`...` and after the last one.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import groupby, pairwise

ELLIPSIS = "..."
INTERRUPT = "^C"

MASKS = [
    # An instance log's stamp first: its time is no `HH:MM:SS` word of its own.
    (re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"), "TIMESTAMP"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "HH:MM:SS"),
    (re.compile(r"\b[0-9a-f]{8,32}\b"), "ID"),  # deployment, version, operation
    (re.compile(r"\b\d+\.\d+s\b"), "N.NNs"),  # `ready in 0.13s`; whole seconds are back-off
    (re.compile(r"(\bpid[= ]|\bprocess |kill -9 |--ppid )\d+"), r"\1PID"),
    (re.compile(r"^(\s*)\d+(\s+)\d+(\s)"), r"\1PID\2PID\3"),  # a row of `ps -o pid,ppid,...`
    (re.compile(r"^(\S+_IN_\d+\s+\d+\s+\S+\s+)\d+"), r"\1PID"),  # a row of `rolehost status`
    # Its MEMORY: `-` until the host's first measurement, 5 s after it started.
    (re.compile(r"^(\S+_IN_\d+\s+\d+\s+\S+\s+\S+\s+)(?:\d+MB|-)(?=\s)"), r"\1MEM"),
    (re.compile(r"\S*/bin/python[\d.]*\b"), "PYTHON"),
    (re.compile(r"\S*/rolehost/__init__\.py"), "ROLEHOST/__init__.py"),
    (re.compile(r"\blimited_user=\S+"), "limited_user=USER"),  # root, nobody, you
    (re.compile(r"\brelay=\w+"), "relay=BUILD"),  # compiled, or not where no C compiler
]

# Only as root where `nobody` cannot run this Python (README.md, "running as root").
MACHINE_LINES = [re.compile(r"limited user unavailable")]

_PREFIX = re.compile(r"^(?:HH:MM:SS )?(\S+)\s+\| ")
_INSTANCE = re.compile(r"\b\w+_IN_\d+\b")


@dataclass
class Step:
    """A command and what it printed; `run` False: shown in the doc, not run by the test
    (its output is not compared)."""

    command: str
    output: list[str] = field(default_factory=list)
    run: bool = True


def parse(block: str) -> list[Step]:
    steps: list[Step] = []
    for line in block.splitlines():
        if line.startswith("$ ") or line == INTERRUPT:
            steps.append(Step(line.removeprefix("$ ")))
        elif steps:
            steps[-1].output.append(line)
        else:
            raise ValueError(f"output before any command: {line!r}")
    return steps


def render(steps: list[Step]) -> str:
    lines = []
    for step in steps:
        lines.append(step.command if step.command == INTERRUPT else f"$ {step.command}")
        lines += step.output
    return "\n".join(lines) + "\n"


def mask(line: str, paths: Mapping[str, str]) -> str:
    for real, shown in paths.items():
        line = line.replace(real, shown)
    for pattern, token in MASKS:
        line = pattern.sub(token, line)
    return " ".join(line.split())


def machine_specific(line: str) -> bool:
    return any(p.search(line) for p in MACHINE_LINES)


def stream(line: str) -> tuple[str, str] | None:
    """Which stream a masked line is of: an instance's output, the events about an
    instance, or None for a line about no instance."""
    if (prefix := _PREFIX.match(line)) and prefix.group(1) != "rolehost":
        return "output", prefix.group(1)
    if instance := _INSTANCE.search(line):
        return "events", instance.group(0)
    return None


def _streams(lines: list[str]) -> dict[tuple[str, str] | None, list[str]]:
    by_stream = defaultdict(list)
    for line in lines:
        by_stream[stream(line)].append(line)
    return dict(by_stream)


def fits(expected: list[str], window: list[str]) -> bool:
    """Whether `window` is `expected` up to the interleaving of streams."""
    if len(expected) != len(window):
        return False
    fixed = [i for i, line in enumerate(expected) if stream(line) is None]
    if fixed != [i for i, line in enumerate(window) if stream(line) is None]:
        return False
    if any(expected[i] != window[i] for i in fixed):
        return False
    return all(_streams(expected[lo + 1:hi]) == _streams(window[lo + 1:hi])
               for lo, hi in pairwise([-1, *fixed, len(expected)]))


def match(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` is `expected`, each `...` in it standing for any run of lines."""
    if ELLIPSIS not in expected:
        return fits(expected, actual)
    pieces = [list(g) for wild, g in groupby(expected, lambda x: x == ELLIPSIS) if not wild]
    open_start, open_end = expected[0] == ELLIPSIS, expected[-1] == ELLIPSIS
    at = 0
    for i, piece in enumerate(pieces):
        if i == 0 and not open_start:
            if not fits(piece, actual[:len(piece)]):
                return False
            at = len(piece)
        elif i == len(pieces) - 1 and not open_end:
            start = len(actual) - len(piece)
            return start >= at and fits(piece, actual[start:])
        else:  # the leftmost fit leaves the most room for the pieces after it
            starts = range(at, len(actual) - len(piece) + 1)
            start = next((s for s in starts if fits(piece, actual[s:s + len(piece)])), None)
            if start is None:
                return False
            at = start + len(piece)
    return True


def compare(name: str, shown: list[Step], ran: list[Step], paths: Mapping[str, str]) -> str:
    """What differs between the doc's block `name` and the run, as a diff; "" if nothing."""

    def masked(lines: list[str]) -> list[str]:
        return [mask(line, paths) for line in lines if not machine_specific(line)]

    problems = []
    if [mask(s.command, paths) for s in shown] != [mask(s.command, paths) for s in ran]:
        problems.append(f"commands: the doc shows {[s.command for s in shown]}, the test ran "
                        f"{[s.command for s in ran]}")
    for doc, real in zip(shown, ran, strict=False):
        if not real.run:
            continue
        expected, actual = masked(doc.output), masked(real.output)
        if not match(expected, actual):
            diff = difflib.unified_diff(expected, actual, "doc (masked)", "run (masked)",
                                        lineterm="")
            problems.append(f"$ {doc.command}\n" + "\n".join(diff))
    return "\n".join(f"[{name}] {p}" for p in problems)


def regenerate(shown: list[Step], ran: list[Step], paths: Mapping[str, str]) -> list[Step]:
    """The run's steps as the doc should show them: `...` trims kept, unrun steps as
    shown, the run's own paths as the doc shows them (`paths`), nothing else masked."""

    def unmoved(line: str) -> str:
        for real, doc in paths.items():
            line = line.replace(real, doc)
        return line

    steps = []
    for doc, real in zip(shown, ran, strict=False):
        if not real.run:
            steps.append(doc)
            continue
        output = [unmoved(line) for line in real.output if not machine_specific(line)]
        if ELLIPSIS in doc.output:
            head = doc.output.index(ELLIPSIS)
            tail = len(doc.output) - 1 - max(i for i, x in enumerate(doc.output) if x == ELLIPSIS)
            if len(output) >= head + tail:  # kept even where it stands for no line now
                output = [*output[:head], ELLIPSIS, *output[len(output) - tail:]]
        steps.append(Step(unmoved(real.command), output))
    return steps


BLOCK = re.compile(r"<!-- transcript: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)


def blocks(page: str) -> dict[str, tuple[str, str]]:
    """Each named block of a page: name -> (language, text)."""
    found: dict[str, tuple[str, str]] = {}
    for m in BLOCK.finditer(page):
        if m.group(1) in found:
            raise ValueError(f"two transcripts named {m.group(1)}")
        found[m.group(1)] = (m.group(2), m.group(3))
    return found


def rewrite(page: str, texts: Mapping[str, str]) -> str:
    """`page` with the text of each block named in `texts` replaced."""
    def replace(m: re.Match[str]) -> str:
        text = texts.get(m.group(1), m.group(3))
        return f"<!-- transcript: {m.group(1)} -->\n```{m.group(2)}\n{text}```"

    return BLOCK.sub(replace, page)
