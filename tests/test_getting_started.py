"""docs/getting-started.md, run as written: its commands, and its transcripts compared with
what they print (tests/transcripts.py says how), its `.rolehost/` tree with a real one.

When rolehost's output changes on purpose, rewrite the page's transcripts from a real run:

    pytest tests/test_getting_started.py --update-transcripts

then read the diff: the run's own pids, times and ids replace the page's, the page's `...`
trims are kept (the lines before the first `...` and after the last), and the tree is
only checked (its lines are prose).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

import transcripts
from rolehost.cli import cli
from rolehost.client import Client
from rolehost.testing import wait_until
from support.processes import end_run_dir
from transcripts import INTERRUPT, Step

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "getting-started.md"
BIN = str(Path(sys.executable).parent)  # `rolehost` and `python` of this install


def blocks() -> list[str]:
    text = PAGE.read_text()
    return re.findall(r"<!-- run: getting-started -->\n```sh\n(.*?)```", text, re.S)


def test_the_page_has_runnable_blocks() -> None:
    assert blocks(), "docs/getting-started.md lost its <!-- run: getting-started --> blocks"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks())))
def test_the_page_runs_as_written(tmp_path: Path, index: int) -> None:
    with socket.socket() as s:  # the page uses the sample's port as it is
        if s.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.skip("port 8080 is in use on this machine")
    # A copy of the repository's samples, so the page's run directory is not left in it.
    shutil.copytree(ROOT / "samples", tmp_path / "samples",
                    ignore=shutil.ignore_patterns(".rolehost", "__pycache__"))
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    run_dir = tmp_path / "samples" / "web" / ".rolehost"
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks()[index]],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        assert "'failures': 0" in done.stdout
    finally:
        end_run_dir(run_dir)


# The transcripts.

def source(intro: str, language: str) -> str:
    """The code block that follows `intro` on the page: the guide's own files."""
    found = re.search(re.escape(intro) + rf"\n\n```{language}\n(.*?)```", PAGE.read_text(), re.S)
    assert found, f"docs/getting-started.md: no {language} block after {intro!r}"
    return found.group(1)


def test_every_transcript_of_the_page_is_checked() -> None:
    """A console block without a name would go unchecked: each has one the scenario knows."""
    page = PAGE.read_text()
    named = transcripts.blocks(page)
    assert page.count("```console") == sum(1 for kind, _ in named.values() if kind == "console")
    assert set(named) == {*SCENARIO_BLOCKS, "tree"}


def test_the_makefile_line_the_page_quotes_is_the_demo_recipe() -> None:
    """make names the recipe line that was interrupted: `[Makefile:N: demo] Interrupt`."""
    quoted = re.search(r"\[Makefile:(\d+): demo\] Interrupt", PAGE.read_text())
    assert quoted
    lines = (ROOT / "Makefile").read_text().splitlines()
    line = int(quoted.group(1))
    assert lines[line - 2].startswith("demo:") and lines[line - 1].startswith("\t")


SCENARIO_BLOCKS = {
    "make-demo", "install", "mkdir", "check", "check-unknown-key", "check-import-error",
    "start", "ps", "interrupt", "detach", "status", "logs-instance", "logs-events",
    "logs-not-started", "kill", "recovered", "kill-again", "kill-when-stable", "restart",
    "stop", "stopped"}


class Guide:
    """The guide's commands, run in its folder with this install's `rolehost`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
        self.status = 0
        self.foreground: subprocess.Popen[bytes] | None = None

    def run(self, command: str) -> Step:
        if command == "echo $?":  # of the command before, which ran in a shell of its own
            return Step(command, [str(self.status)])
        done = subprocess.run(["bash", "-c", command], cwd=self.folder, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120)
        self.status = done.returncode
        return Step(command, done.stdout.splitlines())

    def run_at_once(self, command: str) -> Step:
        """`command` (a `rolehost` one) run in this process: for a step the page times
        within a back-off of a second or two, which a new interpreter's start can
        outlast on a loaded machine (10 s seen). The same code prints the same lines."""
        args = shlex.split(command)
        assert args[0] == "rolehost"
        done = CliRunner().invoke(cli, [*args[1:], "--file", str(self.folder / "rolehost.toml")])
        self.status = done.exit_code
        return Step(command, done.output.splitlines())

    @contextmanager
    def edited(self, name: str, old: str, new: str) -> Iterator[None]:
        path = self.folder / name
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
        try:
            yield
        finally:
            path.write_text(text)

    # A foreground `rolehost start`, its console in a file.

    def start(self, console: Path) -> None:
        with open(console, "wb") as out:
            # Its own process group, as a shell's foreground job: Ctrl-C signals the group.
            self.foreground = subprocess.Popen(
                ["bash", "-c", "exec rolehost start"], cwd=self.folder, env=self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.console = console

    def lines(self) -> list[str]:
        text = self.console.read_text(errors="replace")
        return text[:text.rfind("\n") + 1].splitlines()  # whole lines only

    def wait_console(self, what: str, done: Callable[[list[str]], bool]) -> list[str]:
        def lines_once_done() -> list[str] | None:
            lines = self.lines()
            return lines if done(lines) else None

        return wait_until(lines_once_done, 60, what, lambda: "\n".join(self.lines()))

    def interrupt(self) -> list[str]:
        """Ctrl-C: SIGINT to the foreground group; what the console printed after it."""
        assert self.foreground is not None
        before = len(self.lines())
        os.killpg(self.foreground.pid, signal.SIGINT)
        assert self.foreground.wait(60) == 0, "\n".join(self.lines())
        return self.lines()[before:]

    def kill_everything(self, run_dir: Path) -> None:
        if self.foreground is not None and self.foreground.poll() is None:
            os.killpg(self.foreground.pid, signal.SIGKILL)
            self.foreground.wait(10)
        end_run_dir(run_dir)

    # The detached controller, asked through the API (not a step of the guide).

    def instance(self, name: str) -> dict[str, object]:
        return Client(self.folder / ".rolehost" / "control.sock").instance(name)

    def wait_state(self, name: str, state: str) -> None:
        wait_until(lambda: self.instance(name)["state"] == state, 30, f"{name} {state}")

    def wait_instance(self, name: str, restarts: int) -> dict[str, object]:
        def ready() -> dict[str, object] | None:
            i = self.instance(name)
            return i if i["state"] == "ready" and i["restarts"] == restarts else None

        return wait_until(ready, 60, f"{name} ready after {restarts} restarts")

    def wait_event(self, text: str) -> None:
        log = self.folder / ".rolehost" / "logs" / "controller.log"
        wait_until(lambda: text in log.read_text(), 30, f"{text!r} in the controller's log")


def both(text: str) -> Callable[[list[str]], bool]:
    return lambda lines: sum(text in line for line in lines) == 2


def run_the_guide(folder: Path) -> tuple[dict[str, list[Step]], set[str]]:
    """Every transcript of the page, from one run of its commands, in the order a reader
    runs them; and the `.rolehost/` tree."""
    guide, ran = Guide(folder), {}
    ran["logs-not-started"] = [guide.run("rolehost logs")]
    ran["install"] = [Step("python3 -m venv .venv && .venv/bin/pip install -e .", run=False),
                      Step("source .venv/bin/activate", run=False),
                      guide.run("rolehost --version")]
    ran["mkdir"] = [Step("mkdir /tmp/tutorial && cd /tmp/tutorial")]  # the test made it
    ran["check"] = [guide.run("rolehost check")]
    with guide.edited("rolehost.toml", "instances = 2", "instance = 2"):
        ran["check-unknown-key"] = [guide.run("rolehost check"), guide.run("echo $?")]
    with guide.edited("worker.py", "import RoleEntryPoint", "import RoleEntrypoint"):
        ran["check-import-error"] = [guide.run("rolehost check")]

    guide.start(folder.parent / "foreground.txt")
    guide.wait_console("tick 1 of both instances", both("tick 1:"))
    assert guide.foreground is not None
    # The standby is started beside the first boot: on a loaded machine, maybe later.
    controller = psutil.Process(guide.foreground.pid)
    wait_until(lambda: len(controller.children()) == 3, 30, "the two hosts and the standby")
    ran["ps"] = [guide.run(f"ps -o pid,ppid,args --ppid {guide.foreground.pid}")]
    ran["start"] = [Step("rolehost start", guide.wait_console("tick 2", both("tick 2:")))]
    ran["interrupt"] = [Step(INTERRUPT, guide.interrupt())]

    ran["detach"] = [guide.run("rolehost start --detach")]
    guide.wait_instance("worker_IN_0", 0)
    guide.wait_instance("worker_IN_1", 0)
    ran["status"] = [guide.run("rolehost status")]
    ran["logs-instance"] = [guide.run("rolehost logs worker/0")]
    ran["logs-events"] = [guide.run("rolehost logs")]

    # Within the 1 s back-off: the status must come after the controller saw the death,
    # and before the next try.
    ran["kill"] = [guide.run(f"kill -9 {guide.instance('worker_IN_0')['pid']}")]
    guide.wait_state("worker_IN_0", "recycling")
    ran["kill"].append(guide.run_at_once("rolehost status"))
    pid = guide.wait_instance("worker_IN_0", 1)["pid"]
    ran["recovered"] = [guide.run("rolehost status"), guide.run("rolehost logs -n 6")]
    ran["kill-again"] = [guide.run(f"kill -9 {pid}")]
    guide.wait_event("next try in 2s")  # and the last two lines until the next try, 2 s on
    ran["kill-again"].append(guide.run_at_once("rolehost logs -n 2"))

    # "Let the instance run for more than a minute" (stable_after = 1m), then kill it.
    since = time.time()
    pid = guide.wait_instance("worker_IN_0", 2)["pid"]
    wait_until(lambda: time.time() > since + 62, 90, "the instance to be stable")
    ran["kill-when-stable"] = [guide.run("rolehost status"), guide.run(f"kill -9 {pid}")]
    guide.wait_instance("worker_IN_0", 3)
    ran["kill-when-stable"].append(guide.run("rolehost logs -n 6"))

    ran["restart"] = [guide.run("rolehost restart worker/1 --wait"),
                      guide.run("rolehost logs -n 9"), guide.run("rolehost status")]
    tree = actual_tree(folder / ".rolehost", opaque=leaves(doc_tree()))
    ran["stop"] = [guide.run("rolehost stop"), guide.run("rolehost logs -n 8")]
    ran["stopped"] = [guide.run("rolehost status"), guide.run("echo $?")]
    return ran, tree


def run_the_demo(checkout: Path) -> list[Step]:
    """`make demo`: what make prints of its recipe (read from the Makefile), then the
    sample's foreground run in a copy of samples/hello, until both instances are ready."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.*)$", makefile, re.M)
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", makefile, re.M)
    sample = re.search(r"^SAMPLE\s*\?=\s*(\S+)", makefile, re.M)
    assert recipe and venv and sample and sample.group(1) == "hello"
    echo = (recipe.group(1).replace("$(BIN)", f"{venv.group(1)}/bin")
            .replace("$(SAMPLE)", sample.group(1)))
    shutil.copytree(ROOT / "samples" / "hello", checkout / "samples" / "hello",
                    ignore=shutil.ignore_patterns(".rolehost", "__pycache__"))
    guide = Guide(checkout / "samples" / "hello")
    try:
        guide.start(checkout / "demo.txt")
        shown = guide.wait_console("both instances ready", both("starting -> ready"))
        guide.interrupt()
    finally:
        guide.kill_everything(guide.folder / ".rolehost")
    return [Step("make demo", [echo, *shown])]


def doc_tree() -> set[str]:
    """The paths the page's `.rolehost/` tree shows: `dir/` for folders."""
    _, text = transcripts.blocks(PAGE.read_text())["tree"]
    paths: set[str] = set()
    stack: list[str] = []
    for line in text.splitlines():
        depth, name = (len(line) - len(line.lstrip())) // 2, line.split()[0]
        stack[depth:] = [name]
        path = "".join(stack)
        paths |= {path[:i + 1] for i, c in enumerate(path) if c == "/"}  # and its parents
        paths.add(path)
    return paths


def leaves(tree: set[str]) -> set[str]:
    """The folders the page shows nothing in: what is in them is the role's own."""
    return {p for p in tree if p.endswith("/") and not any(
        q != p and q.startswith(p) for q in tree)}


def actual_tree(run_dir: Path, opaque: set[str]) -> set[str]:
    """The run directory's paths as the page names them: the package's version as
    VERSION, every instance as worker_IN_0."""

    def named(path: str) -> str:
        path = re.sub(r"_IN_\d+", "_IN_0", path)
        return re.sub(r"^\.rolehost/packages/[^/]+/", ".rolehost/packages/VERSION/", path)

    found = {".rolehost/"}

    def walk(folder: Path, shown: str) -> None:
        for entry in sorted(folder.iterdir()):
            is_dir = entry.is_dir() and not entry.is_symlink()
            path = named(shown + entry.name + ("/" if is_dir else ""))
            found.add(path)
            if is_dir and path not in opaque:
                walk(entry, path)

    walk(run_dir, ".rolehost/")
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)  # a minute and more of it waits for an instance to be stable
def test_the_transcripts_are_what_rolehost_prints(request: pytest.FixtureRequest) -> None:
    # Short: the sample's socket path, deep in a copy of the checkout, must fit in 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="rh-guide-"))
    folder, checkout = short / "tutorial", short / "src"
    folder.mkdir()
    (folder / "worker.py").write_text(source("Put the role in `worker.py`:", "python"))
    (folder / "rolehost.toml").write_text(
        source("Describe the service in `rolehost.toml`, in the same folder:", "toml"))
    try:
        ran, tree = run_the_guide(folder)
        ran["make-demo"] = run_the_demo(checkout)
    finally:
        Guide(folder).kill_everything(folder / ".rolehost")
        shutil.rmtree(short)
    # Longest first, should one hold another.
    paths = dict(sorted({str(folder): "/tmp/tutorial", str(checkout): "/src/rolehost",
                         str(ROOT): "/src/rolehost"}.items(), key=lambda kv: -len(kv[0])))
    page = PAGE.read_text()
    shown = {name: transcripts.parse(text) for name, (kind, text) in
             transcripts.blocks(page).items() if kind == "console"}
    assert set(shown) == set(ran)
    if request.config.getoption("--update-transcripts"):
        texts = {name: transcripts.render(transcripts.regenerate(shown[name], ran[name], paths))
                 for name in ran}
        PAGE.write_text(transcripts.rewrite(page, texts))
    else:
        problems = [p for name in ran if (p := transcripts.compare(name, shown[name], ran[name],
                                                                   paths))]
        assert not problems, ("docs/getting-started.md differs from what rolehost prints "
                              "(`--update-transcripts` rewrites it):\n" + "\n\n".join(problems))
    expected = doc_tree()
    assert tree == expected, (f"the page's .rolehost/ tree lacks {sorted(tree - expected)} "
                              f"and shows {sorted(expected - tree)}, which a run lacks")
