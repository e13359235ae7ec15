"""Instructions per relayed request: rolehost's balancer against nginx, counted by callgrind.

    python bench/instructions.py [--requests N] [--connections C] [--rounds R]
                                 [--json out.json] [--keep]

The deterministic companion to balancer.py: wall-clock throughput on a shared machine moves
with whatever else runs, but the user-space instructions a proxy executes per request do
not. valgrind's callgrind counts them (the same binary and inputs give the same count to
within a fraction of a percent). Kernel work is not counted: strace counts the system calls
each proxy makes per request, reported beside.

1. System calls (native, no valgrind): a controller (`rolehost start` in the foreground)
   over balancer.py's two-instance service, and a single-process nginx over the same two
   instances; `strace -c -f -p PID` on each while an exact number of requests goes through.
2. Instructions, compiled relay against nginx: the controller of a second copy of the
   service runs under `valgrind --tool=callgrind --instr-atstart=no` (its hosts run
   natively), and so does a single-process nginx (`master_process off`) relaying to the
   same two instances. For each measurement: C keep-alive connections, a warm-up, then
   `callgrind_control -i on`, exactly N requests shaped like wrk's (every response checked:
   200 and the 6-byte body), `-i off` and a dump; PROGRAM TOTALS / N from callgrind_annotate.
   `--rounds` alternates rolehost and nginx R times. Then 5 s of each with no request, to
   show the background (rolehost's health probes and timers), which the report subtracts
   from Ir/request as an estimate beside the raw figure.
3. The same for a third copy whose controller cannot import the mypyc build (a copy of the
   `rolehost` package without its extensions first on its PYTHONPATH): the interpreted relay.

Everything the bench starts carries a token in its environment; at the end it looks with
psutil for any survivor (also by the work folder on the command line, and nginx's recorded
pids), kills it and reports it. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import balancer as balancer_bench  # bench/balancer.py: the role, the definition, nginx's config
import psutil
from common import (
    BenchError,
    child_env,
    closing_sections,
    free_port,
    kill_ours,
    leave,
    load_average,
    machine,
    sigterm_as_exit,
    wait_until,
)

import rolehost

REQUESTS = 20_000  # per measurement
CONNECTIONS = 8
ROUNDS = 2
WARMUP = 400  # requests on the measurement's connections before instrumentation is on
IDLE_SECONDS = 5.0  # instrumented with no requests: each proxy's background
STRACE_REQUESTS = 5_000  # at most; fewer with a smaller --requests
TOP = 10  # functions listed per contender

COMPILED = "rolehost (compiled)"
INTERPRETED = "rolehost (interpreted)"
NGINX = "nginx"

NATIVE_STARTUP_TIMEOUT = 60.0  # a controller up, every instance ready and in rotation
VALGRIND_STARTUP_TIMEOUT = 300.0  # the same with the controller under valgrind
NGINX_TIMEOUT = 120.0  # nginx answering (under valgrind: tens of seconds at worst)
RESPONSE_TIMEOUT = 60.0  # one response, on any connection (socket timeout)
CONTROL_TIMEOUT = 120.0  # one callgrind_control command (a dump of a big profile)
EXIT_TIMEOUT = 120.0  # a stopped controller's or nginx's process gone (valgrind writes out)
STRACE_TIMEOUT = 30.0  # strace attached, or gone after SIGINT

VALGRIND = ["valgrind", "--tool=callgrind", "--trace-children=no", "--instr-atstart=no"]
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"  # what wrk sends
BODY = b"hello\n"  # the role's answer to GET /


# Load: exactly N requests over C keep-alive connections, every response checked.


class Clients:
    """`connections` keep-alive connections to `port`; `run(n)` sends exactly n requests
    (one at a time per connection, spread evenly) and checks that every response is a 200
    with the role's 6-byte body. BenchError on anything else."""

    def __init__(self, port: int, connections: int) -> None:
        self.request = REQUEST % port
        self.sockets: list[socket.socket] = []
        self.buffers: list[bytes] = []
        try:
            for _ in range(connections):
                sock = socket.create_connection(("127.0.0.1", port), timeout=RESPONSE_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(sock)
                self.buffers.append(b"")
        except OSError as exc:
            self.close()
            raise BenchError(f"cannot connect to 127.0.0.1:{port}: {exc}") from exc

    def run(self, requests: int) -> float:
        """Send `requests` requests; the wall time they took."""
        n = len(self.sockets)
        shares = [requests // n + (1 if i < requests % n else 0) for i in range(n)]
        errors: list[str] = []

        def client(index: int, count: int) -> None:
            try:
                for _ in range(count):
                    self.sockets[index].sendall(self.request)
                    status, body = self.response(index)
                    if status != 200 or body != BODY:
                        raise BenchError(f"answer {status} {body[:60]!r}")
            except (OSError, BenchError, ValueError) as exc:
                errors.append(f"connection {index}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(i, k), daemon=True)
                   for i, k in enumerate(shares)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:  # each recv has RESPONSE_TIMEOUT: a stall ends the thread
            thread.join()
        seconds = time.monotonic() - began
        if errors:
            raise BenchError(f"{len(errors)} connection(s) failed; first: {errors[0]}")
        return seconds

    def response(self, index: int) -> tuple[int, bytes]:
        """One response on connection `index`: (status, body); needs Content-Length."""
        sock, buf = self.sockets[index], self.buffers[index]
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self.receive(sock)
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                       if k.strip().lower() == "content-length"), None)
        if length is None:
            raise BenchError(f"no Content-Length in {lines!r}")
        while len(buf) < end + 4 + length:
            buf += self.receive(sock)
        body = buf[end + 4:end + 4 + length]
        self.buffers[index] = buf[end + 4 + length:]
        return status, body

    @staticmethod
    def receive(sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        if not data:
            raise BenchError("the proxy closed the connection")
        return data

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def warm_and_run(port: int, connections: int, requests: int,
                 around: Callable[[Callable[[], float]], float]) -> float:
    """WARMUP requests on fresh connections, then `requests` inside `around` (which switches
    the measurement on and off around the call it is given); the measured wall time."""
    clients = Clients(port, connections)
    try:
        clients.run(WARMUP)
        return around(lambda: clients.run(requests))
    finally:
        clients.close()


# callgrind.


@dataclass
class Function:
    ir: int  # exclusive
    function: str  # as callgrind names it (recursion suffixes merged)
    object: str  # the ELF object, shortened
    source: str  # the source file of most of its cost, shortened
    python: str | None = None  # what a mypyc or Cython function is in Python terms


@dataclass
class Profile:
    total: int  # PROGRAM TOTALS
    functions: list[Function]  # every function callgrind_annotate lists, most Ir first
    by_object: dict[str, int]


class Callgrind:
    """One process under callgrind, driven with callgrind_control."""

    def __init__(self, folder: Path, label: str) -> None:
        self.folder, self.label = folder, label
        self.log = folder / f"{label}.valgrind.log"
        self.pid: int | None = None

    def prefix(self) -> list[str]:
        # %p: a child forked under valgrind that exits without exec writes a file of its own.
        return [*VALGRIND, f"--callgrind-out-file={self.folder}/{self.label}.%p.callgrind",
                f"--log-file={self.log}"]

    @property
    def out(self) -> Path:
        """The final dump's file; callgrind_control's dumps are this + ".1", ".2", ..."""
        return self.folder / f"{self.label}.{self.pid}.callgrind"

    def control(self, *args: str) -> str:
        assert self.pid is not None
        argv = ["callgrind_control", *args, str(self.pid)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=CONTROL_TIMEOUT,
                                  env=child_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"`{shlex.join(argv)}` took over {CONTROL_TIMEOUT:g}s") from exc
        if done.returncode != 0 or "Error" in done.stdout + done.stderr:
            raise BenchError(f"`{shlex.join(argv)}` failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()}")
        return done.stdout

    def instrument(self, on: bool) -> None:
        self.control(f"--instr={'on' if on else 'off'}")

    def dumps(self) -> set[Path]:
        return {p for p in self.folder.glob(f"{self.out.name}.*") if p.suffix[1:].isdigit()}

    def dump(self, description: str) -> Path:
        """Write the counts since the previous dump (callgrind zeroes them) to a new file."""
        before = self.dumps()
        # callgrind_control hands its command to a shell: a description of plain characters.
        self.control("--dump=" + re.sub(r"[^\w.-]+", "-", description))

        def written() -> Path | None:
            new = sorted(self.dumps() - before, key=lambda p: int(p.suffix[1:]))
            if new and "\ntotals:" in new[-1].read_text(errors="replace"):
                return new[-1]
            return None

        return wait_until(f"callgrind's dump of {self.label}", CONTROL_TIMEOUT, written, 0.1)

    def measure(self, run: Callable[[], float]) -> float:
        """Instrumentation on around `run` only (callgrind counts nothing while it is off)."""
        self.instrument(True)
        try:
            return run()
        finally:
            self.instrument(False)


ANNOTATE_LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.+?):(\S+)(?: \[(.+)\])?$")


def annotate(dump: Path) -> Profile:
    """PROGRAM TOTALS and the exclusive Ir of every function, from callgrind_annotate."""
    done = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(dump)],
                          capture_output=True, text=True, timeout=CONTROL_TIMEOUT)
    if done.returncode != 0:
        raise BenchError(f"callgrind_annotate {dump.name} failed: {done.stderr.strip()}")
    total: int | None = None
    # (function, object) -> [Ir, {source: Ir}]; lines callgrind_annotate prints without an
    # object (code inlined from a header) are merged into their function once all are read.
    costs: dict[tuple[str, str | None], list[Any]] = {}
    for line in done.stdout.splitlines():
        if line.rstrip().endswith("PROGRAM TOTALS"):
            total = int(line.split()[0].replace(",", ""))
            continue
        match = ANNOTATE_LINE.match(line)
        if not match:
            continue
        ir = int(match.group(1).replace(",", ""))
        source, function, obj = match.group(2), match.group(3), match.group(4)
        function = re.sub(r"'\d+$", "", function)  # callgrind's recursion levels: one function
        entry = costs.setdefault((function, obj), [0, {}])
        entry[0] += ir
        entry[1][source] = entry[1].get(source, 0) + ir
    if total is None:
        raise BenchError(f"no PROGRAM TOTALS in callgrind_annotate's output for {dump.name}")
    objects: dict[str, set[str]] = {}
    for function, obj in costs:
        if obj is not None:
            objects.setdefault(function, set()).add(obj)
    for function, _ in [k for k in costs if k[1] is None]:
        owners = objects.get(function, set())
        if len(owners) == 1:
            orphan = costs.pop((function, None))
            entry = costs[(function, next(iter(owners)))]
            entry[0] += orphan[0]
            for source, ir in orphan[1].items():
                entry[1][source] = entry[1].get(source, 0) + ir
    functions = [Function(ir, function, short_object(obj), short_source(max(srcs, key=srcs.get)),
                          python_name(function))
                 for (function, obj), (ir, srcs) in costs.items()]
    functions.sort(key=lambda f: -f.ir)
    by_object: dict[str, int] = {}
    for f in functions:
        by_object[f.object] = by_object.get(f.object, 0) + f.ir
    return Profile(total, functions,
                   dict(sorted(by_object.items(), key=lambda kv: -kv[1])))


def short_object(path: str | None) -> str:
    """'uvloop/loop.so', 'libpython3.11.so.1.0', 'rolehost__mypyc.so', 'nginx'."""
    if path is None:
        return "?"
    tail = path.split("/site-packages/", 1)[1] if "/site-packages/" in path else Path(path).name
    return re.sub(r"\.cpython-[^.]+", "", tail)


def short_source(path: str) -> str:
    """The source file without its build folder: 'Objects/obmalloc.c', 'mypyc/lib-rt/x.c'."""
    if path.startswith("???"):
        return "?"
    if match := re.search(r"/Python-[\d.]+/(.+)$", path):
        return match.group(1)
    if match := re.search(r"/(mypyc/lib-rt/.+)$", path):
        return match.group(1)
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1]
    return "/".join(Path(path).parts[-2:])


def mypyc_modules() -> dict[str, Path]:
    """The modules setup.py compiles, by name (`rolehost.balancer.proxy.client`), each with its
    extension: the `.so` files in the package and its subpackages (the group's shared
    library, `rolehost__mypyc`, lies outside the package)."""
    package = Path(rolehost.__file__).parent
    found = {}
    for path in sorted(package.rglob("*.so")):
        parts = [*path.relative_to(package.parent).parent.parts, path.name.partition(".")[0]]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@functools.cache
def mypyc_prefixes() -> list[tuple[str, str]]:
    """(C name prefix, module) for each compiled module, longest prefix first. mypyc names a
    module by the shortest end of its name that no other module of the build ends with,
    dots as `___` (mypyc/namegen.py): rolehost.balancer.proxy.client's functions are
    `client___...`."""
    ends = {name: ["", *(".".join(name.split(".")[-n:]) + "."
                         for n in range(1, name.count(".") + 2))]
            for name in mypyc_modules()}
    counts: dict[str, int] = {}
    for candidates in ends.values():
        for end in candidates:
            counts[end] = counts.get(end, 0) + 1
    prefixes = []
    for name, candidates in ends.items():
        end = next((end for end in candidates if counts[end] == 1), candidates[-1])
        prefixes.append((end.replace(".", "___"), name))
    return sorted(prefixes, key=lambda pair: -len(pair[0]))


def python_name(function: str) -> str | None:
    """mypyc's `CPyDef_client___HttpClient____next` is
    `rolehost.balancer.proxy.client.HttpClient._next` (the module's prefix: `mypyc_prefixes`);
    Cython's `__pyx_f_6uvloop_4loop_8UVStream__exec_write` is
    `uvloop.loop.UVStream._exec_write`."""
    for prefix, kind in (("CPyDef_", ""), ("CPyPy_", " (its Python-callable wrapper)")):
        if function.startswith(prefix):
            name = function[len(prefix):]
            for short, module in mypyc_prefixes():
                if name.startswith(short):
                    return f"{module}.{'.'.join(name[len(short):].split('___'))}{kind}"
            return None
    if function.startswith("__pyx_f_"):  # cdef functions: length-prefixed parts, then _name
        rest, parts = function[len("__pyx_f_"):], []
        while match := re.match(r"\d+", rest):
            size = int(match.group())
            parts.append(rest[match.end():match.end() + size])
            rest = rest[match.end() + size:]
            rest = rest[1:] if rest.startswith("_") else rest
        if parts and rest:
            return ".".join([*parts, rest])
    return None


# The processes.


class Service(balancer_bench.Rolehost):
    """balancer.py's two-instance service, its controller a child of the bench in the
    foreground (`rolehost start`), optionally under a prefix (valgrind) and with its own
    environment (the interpreted relay's PYTHONPATH). Its hosts run natively."""

    def __init__(self, work: Path, prefix: list[str], env: dict[str, str]) -> None:
        super().__init__(work, free_port())
        self.prefix, self.env = prefix, env
        self.popen: subprocess.Popen[bytes] | None = None
        self.console = self.root / "console.log"

    def start_foreground(self, timeout: float) -> None:
        argv = [*self.prefix, sys.executable, "-m", "rolehost", "start", "-f",
                str(self.definition), "--run-dir", str(self.run_dir), "--no-console"]
        with open(self.console, "ab") as console:
            # cwd: `python -m` puts it first on sys.path, before PYTHONPATH; the definition's
            # folder holds no `rolehost` folder (the one above does: balancer.py's layout).
            self.popen = subprocess.Popen(argv, cwd=self.root, env=self.env,
                                          stdin=subprocess.DEVNULL, stdout=console,
                                          stderr=subprocess.STDOUT, start_new_session=True)

        def answering() -> int | None:
            assert self.popen is not None
            if self.popen.poll() is not None:
                tail = self.console.read_text(errors="replace").strip()[-1500:]
                raise BenchError(f"the controller exited with {self.popen.returncode}: {tail}")
            try:
                return int(self.client.status()["pid"])
            except Exception:  # not listening yet
                return None

        self.pid = wait_until("the controller's control API", timeout, answering, 0.5)
        if self.pid != self.popen.pid:
            raise BenchError(f"the control API answers for pid {self.pid}, not for the "
                             f"controller the bench started ({self.popen.pid})")
        wait_until("every instance ready and in rotation", timeout, self.serving, 0.5)

    def ports(self) -> list[int]:
        """The instances' private ports, from `rolehost status --json`."""
        return [int(i["endpoints"]["http"]["port"]) for i in self.status()["instances"]]

    def relay(self) -> str:
        """Which relay the controller loaded (its memory maps: the mypyc group module or
        not), and what its log says (`controller_started relay=...`)."""
        assert self.pid is not None
        maps = {m.path for m in psutil.Process(self.pid).memory_maps()}
        loaded = "compiled" if any("rolehost__mypyc" in p for p in maps) else "interpreted"
        said = "?"
        for log in (self.run_dir / "logs").glob("controller*"):
            for line in log.read_text(errors="replace").splitlines():
                if "controller_started" in line and (m := re.search(r"relay\W+(\w+)", line)):
                    said = m.group(1)
        return f"{loaded} (mypyc module {'mapped' if loaded == 'compiled' else 'not mapped'}; " \
               f"the controller's log says relay={said})"

    def shutdown(self) -> None:
        """`rolehost stop`, then wait for the process (valgrind writes its last dump)."""
        if self.popen is None:
            return
        try:
            if self.popen.poll() is None:
                self.stop()
        finally:
            try:
                self.popen.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


class SingleNginx(balancer_bench.Nginx):
    """balancer.py's nginx config (same upstreams, keepalive 64, the same 3 headers,
    access_log off) with `master_process off`: one process accepts and relays, optionally
    under a prefix (valgrind). balancer.py's second server block (max_fails=0, on another
    port) stays in the config, idle."""

    def __init__(self, work: Path, upstreams: list[int], prefix: list[str]) -> None:
        super().__init__(work, free_port(), free_port(), upstreams)
        conf = self.conf.read_text()
        self.conf.write_text(conf.replace("daemon off;\n", "daemon off;\nmaster_process off;\n",
                                          1))
        self.prefix = prefix

    def start_single(self, timeout: float) -> int:
        self.check(self.argv("-t"))
        self.launch([*self.prefix, *self.argv()], timeout, every=0.5, slow=True)
        assert self.popen is not None
        return self.popen.pid

    def shutdown(self) -> None:
        self.stop()  # SIGQUIT, then SIGTERM and SIGKILL if it lingers
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


# Results.


@dataclass
class Measurement:
    contender: str
    round: int
    requests: int
    connections: int
    ir: int = 0
    seconds: float = 0.0  # wall time of the requests, under callgrind
    dump: str = ""
    top: list[Function] = field(default_factory=list)
    top_rolehost: list[Function] = field(default_factory=list)  # in the mypyc build's module
    by_object: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ir_per_request(self) -> float | None:
        return self.ir / self.requests if self.ir and self.error is None else None

    def net_per_request(self, idle: Idle | None) -> float | None:
        """Ir/request less the process's background over this window's length: an estimate
        (the background is measured once, with no load)."""
        if self.ir_per_request is None or idle is None or idle.ir_per_second is None:
            return None
        return self.ir_per_request - idle.ir_per_second * self.seconds / self.requests


@dataclass
class Idle:
    contender: str
    seconds: float
    ir: int = 0
    top: list[Function] = field(default_factory=list)
    error: str | None = None

    @property
    def ir_per_second(self) -> float | None:
        return self.ir / self.seconds if self.error is None else None


@dataclass
class Syscalls:
    contender: str
    pid: int
    requests: int
    seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Summary:
    contender: str
    measurements: int
    mean: float
    low: float
    high: float
    net: float | None  # mean Ir/request less the background (Measurement.net_per_request)
    net_low: float | None
    net_high: float | None

    @property
    def spread_percent(self) -> float:
        return 100 * (self.high - self.low) / self.mean

    @property
    def net_spread_percent(self) -> float | None:
        if self.net is None or self.net_low is None or self.net_high is None:
            return None
        return 100 * (self.net_high - self.net_low) / self.net


@dataclass
class Results:
    command: str
    machine: dict[str, str]
    settings: dict[str, str] = field(default_factory=dict)
    relay: dict[str, str] = field(default_factory=dict)  # contender -> what it loaded
    measurements: list[Measurement] = field(default_factory=list)
    idle: list[Idle] = field(default_factory=list)
    syscalls: list[Syscalls] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds of each phase
    startup: dict[str, float] = field(default_factory=dict)  # controllers under valgrind
    seconds: float = 0.0
    survivors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def idle_of(self, contender: str) -> Idle | None:
        return next((i for i in self.idle if i.contender == contender and not i.error), None)

    def summary(self, contender: str) -> Summary | None:
        done = [m for m in self.measurements
                if m.contender == contender and m.ir_per_request is not None]
        if not done:
            return None
        values = [m.ir_per_request or 0.0 for m in done]
        nets = [n for m in done if (n := m.net_per_request(self.idle_of(contender))) is not None]
        complete = len(nets) == len(done)
        return Summary(contender, len(values), statistics.mean(values), min(values),
                       max(values), statistics.mean(nets) if complete else None,
                       min(nets) if complete else None, max(nets) if complete else None)


# The phases.


def measure(contender: str, round_: int, port: int, cg: Callgrind, requests: int,
            connections: int) -> Measurement:
    result = Measurement(contender, round_, requests, connections)
    print(f"callgrind: {contender}, round {round_}: {requests} requests...", file=sys.stderr)
    try:
        result.seconds = warm_and_run(port, connections, requests, cg.measure)
        dump = cg.dump(f"{contender} round {round_}")
        profile = annotate(dump)
        result.ir, result.dump = profile.total, dump.name
        result.top, result.by_object = profile.functions[:TOP], profile.by_object
        result.top_rolehost = [f for f in profile.functions
                               if f.object.startswith("rolehost__mypyc")][:TOP]
    except Exception as exc:  # reported; the other measurements still run
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def idle(contender: str, cg: Callgrind) -> Idle:
    """Instrumented for IDLE_SECONDS with no request: what the process does on its own."""
    result = Idle(contender, IDLE_SECONDS)
    try:
        result.seconds = cg.measure(lambda: sleep_for(IDLE_SECONDS))
        profile = annotate(cg.dump(f"{contender} idle"))
        result.ir, result.top = profile.total, profile.functions[:5]
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def sleep_for(seconds: float) -> float:
    began = time.monotonic()
    time.sleep(seconds)
    return time.monotonic() - began


def strace(contender: str, pid: int, port: int, folder: Path, requests: int,
           connections: int) -> Syscalls:
    """`strace -c -f -p PID` around exactly `requests` requests (after a warm-up)."""
    result = Syscalls(contender, pid, requests)
    out, err = folder / f"strace.{contender}.txt", folder / f"strace.{contender}.err"
    print(f"strace: {contender} (pid {pid}): {requests} requests...", file=sys.stderr)
    proc: subprocess.Popen[bytes] | None = None

    def traced(run: Callable[[], float]) -> float:
        nonlocal proc
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                                    env=child_env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr)

        def attached() -> bool | None:
            assert proc is not None
            if proc.poll() is not None:
                raise BenchError(f"strace exited with {proc.returncode}: "
                                 f"{err.read_text(errors='replace').strip()}")
            return True if "attached" in err.read_text(errors="replace") else None

        wait_until("strace to attach", STRACE_TIMEOUT, attached, 0.05)
        try:
            return run()
        finally:
            proc.send_signal(signal.SIGINT)  # strace detaches and writes its summary
            proc.wait(STRACE_TIMEOUT)

    try:
        result.seconds = warm_and_run(port, connections, requests, traced)
        result.calls, result.errors = parse_strace(out.read_text())
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return result


def parse_strace(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """strace -c's table: calls and errors by system call."""
    calls: dict[str, int] = {}
    errors: dict[str, int] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) in (5, 6) and cols[-1] != "total" and re.fullmatch(r"[\d.]+", cols[0]):
            calls[cols[-1]] = int(cols[3])
            if len(cols) == 6:
                errors[cols[-1]] = int(cols[4])
    if not calls:
        raise BenchError(f"no strace summary in {text[:300]!r}")
    return calls, errors


def syscall_phase(results: Results, work: Path, requests: int, connections: int,
                  nginx_pids: set[int]) -> None:
    folder = work / "native"
    folder.mkdir()
    service = Service(folder, [], child_env())
    nginx: SingleNginx | None = None
    try:
        print("strace: starting rolehost and nginx natively...", file=sys.stderr)
        service.start_foreground(NATIVE_STARTUP_TIMEOUT)
        nginx = SingleNginx(folder, service.ports(), [])
        nginx_pid = nginx.start_single(NGINX_TIMEOUT)
        nginx_pids.update(nginx.pids)
        assert service.pid is not None
        results.syscalls.append(strace(COMPILED, service.pid, service.port, folder, requests,
                                       connections))
        results.syscalls.append(strace(NGINX, nginx_pid, nginx.port, folder, requests,
                                       connections))
    finally:
        if nginx is not None:
            nginx.shutdown()
        service.shutdown()


def callgrind_phase(results: Results, work: Path, requests: int, connections: int,
                    rounds: int, nginx_pids: set[int]) -> None:
    """The compiled relay and nginx, alternately, relaying to the same two instances."""
    folder = work / "callgrind"
    folder.mkdir()
    rh_cg, ng_cg = Callgrind(folder, "rolehost"), Callgrind(folder, "nginx")
    service = Service(folder, rh_cg.prefix(), child_env())
    nginx: SingleNginx | None = None
    try:
        start_measured(service, COMPILED, results)
        rh_cg.pid = service.pid
        print("callgrind: starting nginx under valgrind...", file=sys.stderr)
        ports = service.ports()
        results.settings["nginx"] = nginx_text(ports)
        nginx = SingleNginx(folder, ports, ng_cg.prefix())
        ng_cg.pid = nginx.start_single(NGINX_TIMEOUT)
        nginx_pids.update(nginx.pids)
        for round_ in range(1, rounds + 1):
            results.measurements.append(measure(COMPILED, round_, service.port, rh_cg,
                                                requests, connections))
            results.measurements.append(measure(NGINX, round_, nginx.port, ng_cg, requests,
                                                connections))
        print(f"callgrind: {IDLE_SECONDS:g} s idle each...", file=sys.stderr)
        results.idle.append(idle(COMPILED, rh_cg))
        results.idle.append(idle(NGINX, ng_cg))
    finally:
        if nginx is not None:
            nginx.shutdown()
        service.shutdown()


def start_measured(service: Service, contender: str, results: Results) -> None:
    """Start `contender`'s controller under valgrind; note how long it took and which
    relay it loaded."""
    print(f"callgrind: starting the controller for {contender} under valgrind (slow)...",
          file=sys.stderr)
    began = time.monotonic()
    service.start_foreground(VALGRIND_STARTUP_TIMEOUT)
    results.startup[contender] = time.monotonic() - began
    results.relay[contender] = service.relay()


def interpreted_phase(results: Results, work: Path, requests: int, connections: int) -> None:
    """A controller that cannot import the mypyc build: a copy of the `rolehost` package
    without its extensions first on its PYTHONPATH (its hosts inherit it; they do not
    relay). The top-level group module `rolehost__mypyc` is imported only by those
    extensions, so it stays out too."""
    folder = work / "interpreted"
    folder.mkdir()
    pure = folder / "pure"
    shutil.copytree(Path(rolehost.__file__).parent, pure / "rolehost",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    cg = Callgrind(folder, "rolehost")
    service = Service(folder, cg.prefix(), {**child_env(), "PYTHONPATH": str(pure)})
    try:
        start_measured(service, INTERPRETED, results)
        cg.pid = service.pid
        if not results.relay[INTERPRETED].startswith("interpreted"):
            raise BenchError(f"the controller still loaded the compiled relay: "
                             f"{results.relay[INTERPRETED]}")
        results.measurements.append(measure(INTERPRETED, 1, service.port, cg, requests,
                                            connections))
        results.idle.append(idle(INTERPRETED, cg))
    finally:
        service.shutdown()


def run(requests: int, connections: int, rounds: int, keep: bool) -> Results:
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rh-ir-", dir="/tmp"))  # short: socket path limit
    results = Results(shlex.join(["python", *sys.argv]), machine(machine_details()))
    strace_requests = min(requests, STRACE_REQUESTS)
    results.settings = settings(requests, connections, rounds, strace_requests)
    nginx_pids: set[int] = set()
    phases: list[tuple[str, Callable[[], None]]] = [
        ("system calls (native, strace)",
         lambda: syscall_phase(results, work, strace_requests, connections, nginx_pids)),
        ("instructions: compiled relay and nginx (callgrind)",
         lambda: callgrind_phase(results, work, requests, connections, rounds, nginx_pids)),
        ("instructions: interpreted relay (callgrind)",
         lambda: interpreted_phase(results, work, requests, connections)),
    ]
    try:
        for name, phase in phases:
            t0 = time.monotonic()
            try:
                phase()
            except Exception as exc:  # reported; the next phase still runs
                results.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            results.phases[name] = time.monotonic() - t0
    finally:
        # balancer.py's matcher: the token, the work folder on the command line (valgrind's
        # too: it is in --callgrind-out-file), or one of nginx's recorded pids.
        results.survivors = kill_ours(also=balancer_bench.ours_too(work, nginx_pids))
        results.machine["load average at end (1/5/15 min)"] = load_average()
        leave(work, keep)
        results.seconds = time.monotonic() - began
    return results


def machine_details() -> dict[str, str]:
    from importlib.metadata import version

    tool = balancer_bench.tool_version
    return {
        "cpu": balancer_bench.cpu_model(),
        "load average at start (1/5/15 min)": load_average(),
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "valgrind": tool(["valgrind", "--version"]),
        "nginx": tool(["nginx", "-v"]),
        "strace": tool(["strace", "-V"]),
        "httptools": version("httptools"),
        "uvloop": balancer_bench.uvloop_version(),
        "relay build": relay_build(),
    }


def relay_build() -> str:
    """Whether the mypyc extensions the compiled controller loads were built from the
    sources as they are (an editable install's build goes stale when a source changes)."""
    from rolehost import balancer
    from rolehost.balancer.proxy import client

    for module in (client, balancer):  # the relay's package and balancer.py: setup.py's COMPILED
        path = Path(module.__file__ or "")
        if path.suffix != ".so":
            return f"{path.name} is not compiled: the compiled row measures the interpreted relay"
    stale, built = [], []
    for path in mypyc_modules().values():
        source = path.with_name(path.name.partition(".")[0] + ".py")
        built.append(path.stat().st_mtime)
        if source.stat().st_mtime > path.stat().st_mtime:
            stale.append(source.name)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(min(built)))
    if stale:
        return (f"**stale**: {', '.join(stale)} changed after the mypyc build of {when}: the "
                "compiled row measures the old code (reinstall: `pip install -e .`)")
    return f"mypyc extensions built {when}, after their sources' last change"


def settings(requests: int, connections: int, rounds: int, strace_requests: int) -> dict[str, str]:
    return {
        "load": f"{requests} requests per measurement over {connections} keep-alive "
                f"connections (one request at a time on each), after {WARMUP} warm-up requests "
                "on the same connections; each request is wrk's, "
                "`GET / HTTP/1.1\\r\\nHost: 127.0.0.1:PORT\\r\\n\\r\\n`; every response "
                "checked: 200 with the 6-byte body",
        "order": f"{', '.join([COMPILED, NGINX] * rounds)}; then {IDLE_SECONDS:g} s idle each; "
                 f"then {INTERPRETED} once and idle",
        "callgrind": f"`{' '.join(VALGRIND)} --callgrind-out-file=... <proxy>`; "
                     "`callgrind_control --instr=on` just before the requests, `--instr=off` "
                     "and `--dump` after; Ir = callgrind_annotate's PROGRAM TOTALS of the dump",
        "rolehost": "`python -m rolehost start` in the foreground (its hosts run natively): "
                    f"balancer.py's service, {balancer_bench.INSTANCES} instances, round-robin, "
                    "probe GET /healthz every 500 ms",
        "nginx": nginx_text([]),
        "backends": f"{balancer_bench.INSTANCES} instances of balancer.py's role "
                    "(ThreadingHTTPServer, HTTP/1.1 keep-alive, GET / -> 200, 6-byte body); "
                    "rolehost and nginx relay to the same two",
        "strace": f"the same, natively: `strace -c -f -p PID` around {strace_requests} "
                  "requests (after the warm-up)",
    }


def nginx_text(upstreams: list[int]) -> str:
    return ("one process (`master_process off; daemon off;`) with balancer.py's config: "
            + balancer_bench.nginx_settings(upstreams or [0, 0]).replace("worker_processes 1; ",
                                                                      ""))


# Report.


READS = ("read", "readv", "recvfrom", "recvmsg")
WRITES = ("write", "writev", "sendto", "sendmsg")


def io_split(s: Syscalls) -> tuple[float, float, float]:
    """Per request: reads, writes, and every other system call."""
    reads = sum(s.calls.get(n, 0) for n in READS)
    writes = sum(s.calls.get(n, 0) for n in WRITES)
    return (reads / s.requests, writes / s.requests,
            (sum(s.calls.values()) - reads - writes) / s.requests)


def num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(results: Results) -> str:
    lines = [
        "# Instructions per relayed request: rolehost's balancer against nginx (callgrind)", "",
        f"`{results.command}`: {results.seconds / 60:.1f} min", "",
        "## Machine", "", "| | |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in results.machine.items()), "",
        "## Settings", "", "| | |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in results.settings.items()),
        *(f"| relay of {k} | {v} |" for k, v in results.relay.items()), "",
        "Ir: instructions executed in user space by the proxy's process (every thread: the "
        "interpreter, the event loop, the HTTP parser, libc), counted by valgrind. Kernel work "
        "is not counted; the system calls per request are below. The counts do not depend on "
        "what else the machine runs; the wall times do.",
        "",
        "## Instructions per request", "",
        "| contender | round | requests | Ir | Ir/request | s (under callgrind) | dump |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in results.measurements:
        cell = num(m.ir_per_request) if m.error is None else f"**{m.error}**"
        lines.append(f"| {m.contender} | {m.round} | {m.requests} | {m.ir:,} | {cell} "
                     f"| {m.seconds:.1f} | {m.dump} |")
    summaries = {c: found for c in (COMPILED, INTERPRETED, NGINX)
                 if (found := results.summary(c)) is not None}
    nginx = summaries.get(NGINX)
    lines += ["", "| contender | measurements | Ir/request (mean) | min | max | spread "
              "(max-min)/mean | / nginx | net of background (est.) | its spread | / nginx |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for sm in summaries.values():
        several = sm.measurements > 1
        spread = f"{sm.spread_percent:.2f} %" if several else "-"
        net_spread = num(sm.net_spread_percent if several else None, ".2f")
        net_ratio = sm.net / nginx.net if nginx and sm.net and nginx.net else None
        lines.append(f"| **{sm.contender}** | {sm.measurements} | **{sm.mean:,.0f}** "
                     f"| {sm.low:,.0f} | {sm.high:,.0f} | {spread} "
                     f"| {f'{sm.mean / nginx.mean:.2f} x' if nginx else '-'} | {num(sm.net)} "
                     f"| {net_spread}{' %' if net_spread != '-' else ''} "
                     f"| {num(net_ratio, '.2f')}{' x' if net_ratio else ''} |")
    lines += ["", "`spread`: (highest - lowest) / mean of the measurements of one contender. "
              "`net of background`: Ir/request less what the process executes with no request "
              "(measured below) over the window's wall time: rolehost's health probes and "
              "timers run per second, not per request, so the slower the window (a busy "
              "machine, or callgrind itself), the more of them land in it; nginx has "
              "practically none. What is left of the spread is timing too, for both: how "
              "many ready connections each turn of the event loop (one epoll_wait) finds "
              "depends on how fast the client and the backends answer, and a turn costs "
              "instructions of its own."]
    compiled, interpreted = summaries.get(COMPILED), summaries.get(INTERPRETED)
    if compiled and interpreted:
        lines += ["", f"The mypyc build runs the relay in {compiled.mean / interpreted.mean:.2f} "
                  "x the interpreted relay's instructions."]

    lines += ["", "## Background: each process with no request", "",
              f"Instrumented for {IDLE_SECONDS:g} s with no client connection. The measured "
              "windows above include this background for their length (rolehost: health "
              "probes every 500 ms per instance, timers); `share of Ir/request` is the idle "
              "rate x the mean measured window / requests, an estimate (probes may run "
              "differently under load).", "",
              "| contender | s | Ir | Ir/s | share of Ir/request | top functions |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for i in results.idle:
        windows = [m for m in results.measurements if m.contender == i.contender and not m.error]
        share = None
        if windows and i.ir_per_second is not None:
            per = statistics.mean(i.ir_per_second * m.seconds / m.requests for m in windows)
            mean = statistics.mean(m.ir_per_request or 0 for m in windows)
            share = f"{per:,.0f} ({100 * per / mean:.1f} %)" if mean else None
        top = ", ".join(f"`{f.python or f.function}` {f.ir:,}" for f in i.top[:3]) or "-"
        lines.append(f"| {i.contender} | {i.seconds:.1f} | {i.ir:,} | {num(i.ir_per_second)} "
                     f"| {share or '-'} | {top if not i.error else f'**{i.error}**'} |")

    lines += ["", "## System calls per request (strace -c -f, natively)", ""]
    if results.syscalls:
        names = sorted({n for s in results.syscalls for n in s.calls},
                       key=lambda n: -max(s.calls.get(n, 0) / s.requests
                                          for s in results.syscalls))
        lines += ["| system call | " + " | ".join(s.contender for s in results.syscalls) + " |",
                  "| --- |" + " ---: |" * len(results.syscalls)]
        for n in names:
            cells = []
            for s in results.syscalls:
                calls, errors = s.calls.get(n, 0), s.errors.get(n, 0)
                cells.append(f"{calls / s.requests:.3f} ({calls}"
                             + (f", {errors} errors" if errors else "") + ")")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("| **total** | " + " | ".join(
            f"**{sum(s.calls.values()) / s.requests:.3f}** ({sum(s.calls.values())})"
            for s in results.syscalls) + " |")
        lines += ["", "Reads / writes / other: " + "; ".join(
            "{}: {:.2f} / {:.2f} / {:.2f}".format(s.contender, *io_split(s))
            for s in results.syscalls) + " per request."]
        ng = next((s for s in results.syscalls if s.contender == NGINX), None)
        if ng is not None and ng.calls.get("getsockopt", 0) >= 0.9 * ng.requests:
            lines[-1] += (" nginx's extra call per request is a `getsockopt(SO_ERROR)` on the "
                          "upstream connection before it sends the request to it "
                          "(ngx_http_upstream_test_connect, also on a kept-alive connection).")
        lines += ["", "Per request (calls in the window in brackets); requests: "
                  + ", ".join(f"{s.contender} {s.requests} (pid {s.pid}, {s.seconds:.1f} s "
                              "under strace)" for s in results.syscalls) + ". The window "
                  "includes each proxy's background (rolehost's health probes: a connect, "
                  "a request and a close every 500 ms per instance)."]
        lines += [f"- **{s.contender}: {s.error}**" for s in results.syscalls if s.error]

    for contender in (COMPILED, INTERPRETED, NGINX):
        last = [m for m in results.measurements if m.contender == contender and not m.error]
        if not last:
            continue
        m = last[-1]
        lines += ["", f"## Where the instructions go: {contender}", "",
                  f"Top {TOP} functions by exclusive Ir (round {m.round}; per request; "
                  "callgrind_annotate, paths shortened; mypyc and Cython names with their "
                  "Python name).", "",
                  "| Ir/request | % | function | object | source |",
                  "| ---: | ---: | --- | --- | --- |"]
        for f in m.top:
            name = f"`{f.python}` (`{f.function}`)" if f.python else f"`{f.function}`"
            lines.append(f"| {f.ir / m.requests:,.0f} | {100 * f.ir / m.ir:.1f} | {name} "
                         f"| {f.object} | {f.source} |")
        objects = ", ".join(f"{o} {ir / m.requests:,.0f} ({100 * ir / m.ir:.1f} %)"
                            for o, ir in list(m.by_object.items())[:8])
        lines += ["", f"Exclusive Ir by object (Ir/request): {objects}."]
        if m.top_rolehost:
            lines += ["", "rolehost's own compiled functions (mypyc, `rolehost__mypyc.so`), "
                      "exclusive:", "", "| Ir/request | % | Python | mypyc | source |",
                      "| ---: | ---: | --- | --- | --- |"]
            lines += [f"| {f.ir / m.requests:,.0f} | {100 * f.ir / m.ir:.1f} "
                      f"| `{f.python or '-'}` | `{f.function}` | {f.source} |"
                      for f in m.top_rolehost]
        if contender == NGINX and any(f.function.startswith("0x") for f in m.top):
            lines += ["", "nginx's Debian binary is stripped: its static functions show as "
                      "addresses (`0x...`), its exported ones by name."]

    lines += ["", "## Run time", "", "| phase | s |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results.phases.items()]
    lines.append(f"| **total** | **{results.seconds:.0f}** |")
    if results.startup:
        lines += ["", "A controller's start under valgrind (instrumentation off), until both "
                  "instances were ready and in rotation: " + ", ".join(
                      f"{k} {v:.0f} s" for k, v in results.startup.items()) + "."]
    lines += closing_sections(
        results.errors, results.survivors,
        "Each controller was stopped with `rolehost stop` and each nginx with "
        "SIGQUIT, and the bench waited for their processes (valgrind included); no "
        "process started by the bench (valgrind, controllers, hosts, nginx, strace) "
        "survived: checked with psutil by environment token, command line and "
        "recorded pids.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS,
                        help=f"requests per measurement (default {REQUESTS})")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help=f"keep-alive client connections (default {CONNECTIONS})")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"measurements of the compiled relay and of nginx, alternately "
                             f"(default {ROUNDS})")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (definitions, configs, logs, callgrind's "
                             "dumps, strace's tables)")
    args = parser.parse_args()
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    if args.requests < args.connections:
        parser.error("--requests must be at least --connections")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "nginx", "strace"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install -y valgrind nginx "
                         "strace)")

    with sigterm_as_exit():
        results = run(args.requests, args.connections, args.rounds, args.keep)
    print(markdown(results))
    if args.json:
        data = asdict(results)
        for entry, m in zip(data["measurements"], results.measurements, strict=True):
            entry["ir_per_request"] = m.ir_per_request
        for entry, i in zip(data["idle"], results.idle, strict=True):
            entry["ir_per_second"] = i.ir_per_second
        data["summary"] = {c: {**asdict(found), "spread_percent": found.spread_percent,
                               "net_spread_percent": found.net_spread_percent}
                           for c in (COMPILED, INTERPRETED, NGINX)
                           if (found := results.summary(c)) is not None}
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
