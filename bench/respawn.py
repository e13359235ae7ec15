"""Respawn latency and idle cost: rolehost against supervisord and a bare interpreter spawn.

    python bench/respawn.py [--kills N] [--idle-seconds S] [--json out.json] [--keep]

Respawn latency is "SIGKILL of a stable instance -> its replacement runs its first
statement". Every measured program reports that first statement by sending one UDP
datagram (its pid) to the bench; the bench takes `time.time()` just before `os.kill` and
again when the datagram arrives, so both ends are read from one clock in one process.

- rolehost: one instance of a role whose `on_start` sends the datagram first thing,
  `stable_after = "0.5s"` so a crash after 0.5 s of ready restarts with no back-off;
- supervisord 4.x: the same program as a plain script (`autorestart`, `startsecs=0`);
- bare spawn, the floor: `subprocess.Popen([python, probe.py])` -> datagram.

Idle cost samples the supervising process (rolehost's controller, supervisord) while it
watches 10 idle children: CPU as a share of one core, and its peak RSS.

Everything the bench starts carries a token in its environment, so at the end it can find
(with psutil) and report any process it started that survived, descendants included.
Figures are reported against the targets; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from common import (
    STOP_TIMEOUT,
    BenchError,
    Controller,
    child_env,
    closing_sections,
    kill_ours,
    leave,
    machine,
    sigterm_as_exit,
    verdict,
    wait_until,
)

STABLE_AFTER = 0.5  # rolehost's [service] stable_after, in seconds
# Kill only once the instance has been ready this much longer than stable_after: the
# controller judges stability when it has processed the exit, a little after the kill.
STABLE_MARGIN = 0.1
# A random pause before each kill, the same for rolehost and supervisord, so that kills
# do not fall in step with a periodic tick (supervisord's main loop polls once a second).
JITTER = 1.0
RESPAWN_TIMEOUT = 15.0  # one kill -> datagram
STARTUP_TIMEOUT = 90.0  # a controller or supervisord up, all its children running
IDLE_INSTANCES = 10
RSS_SAMPLE_INTERVAL = 0.5

TARGET_VS_SUPERVISORD = 0.1  # rolehost respawn p50 <= 1/10 of supervisord's
TARGET_VS_FLOOR = 2.0  # rolehost respawn p50 <= 2x the bare spawn p50
TARGET_IDLE_CPU = 0.5  # % of one core
TARGET_IDLE_RSS_MB = 60.0

SUPERVISORD_SETTINGS = (
    "autorestart=true, startsecs=0, startretries=3, stdout to a log file, loglevel=info"
)


# The probe: what every measured program reports to.


class Probe:
    """A UDP socket on 127.0.0.1; each datagram is the pid of a program that just started."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.seen: set[int] = set()  # every pid that has reported, for "has it started?"

    def wait(self, accept: Callable[[int], bool], timeout: float) -> tuple[int, float]:
        """The first datagram whose pid `accept`s: (pid, time.time() at its arrival)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no datagram within {timeout:g}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(64)
            except TimeoutError:
                continue
            arrived = time.time()  # first thing after the wake-up: this is the measurement
            pid = int(data)
            accepted = accept(pid)  # before `seen` learns of it: accept may ask "is it new?"
            self.seen.add(pid)
            if accepted:
                return pid, arrived

    def wait_new(self, timeout: float) -> float:
        """When a pid that never reported before reported (a replacement has started)."""
        return self.wait(lambda pid: pid not in self.seen, timeout)[1]

    def wait_pid(self, pid: int, timeout: float) -> float:
        return self.wait(lambda reported: reported == pid, timeout)[1]

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                self.seen.add(int(self.sock.recv(64)))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def probe_program(port: int, preamble: str = "") -> str:
    """The plain program run by supervisord and the floor: report, then idle forever.

    Only `socket` and `time` are imported (`os` is loaded by the interpreter anyway), as a
    minimal role does before its first statement.
    """
    return preamble + textwrap.dedent(f"""\
        import os
        import socket
        import time

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(str(os.getpid()).encode(), ("127.0.0.1", {port}))
        while True:
            time.sleep(3600)
        """)


def probe_role(port: int) -> str:
    """The rolehost equivalent: the same datagram, first thing in on_start."""
    return textwrap.dedent(f"""\
        import os
        import socket

        from rolehost import RoleEntryPoint


        class Probe(RoleEntryPoint):
            def on_start(self) -> bool:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(str(os.getpid()).encode(), ("127.0.0.1", {port}))
                return True


        class Idle(RoleEntryPoint):
            pass  # the default run(): wait for a stop
        """)


# Results.


@dataclass
class Latency:
    name: str
    settings: str
    samples: list[float] = field(default_factory=list)  # seconds
    error: str | None = None

    @property
    def p50(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def p95(self) -> float | None:
        if len(self.samples) < 2:
            return self.samples[0] if self.samples else None
        return statistics.quantiles(self.samples, n=100, method="inclusive")[94]


@dataclass
class Idle:
    name: str
    seconds: float = 0.0
    cpu_percent: float | None = None  # of one core
    rss_max_mb: float | None = None
    children_rss_mb: float | None = None  # the 10 supervised processes together, for context
    error: str | None = None


@dataclass
class Results:
    machine: dict[str, str]
    kills: int
    respawn: list[Latency] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)  # rolehost, seconds
    idle: list[Idle] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)


# Process hygiene.


def end(popen: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a child, SIGKILL it if it lingers, and reap it."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout)


# rolehost.


class Rolehost(Controller):
    """A rolehost controller over a generated definition, in the bench's work folder."""

    def __init__(self, work: Path, name: str, role: str, instances: int, port: int) -> None:
        app = work / name / "app"
        app.mkdir(parents=True)
        (app / "probe_role.py").write_text(probe_role(port))
        super().__init__(work / name, textwrap.dedent(f"""\
            [service]
            name = "{name}"
            stable_after = "{STABLE_AFTER:g}s"

            [roles.{role}]
            entry_point = "probe_role:{role.capitalize()}"
            app = "app"
            instances = {instances}
            stop_timeout = "10s"
            """), client_timeout=5.0)

    def all_ready(self) -> list[dict[str, Any]] | None:
        instances = self.instances()
        return instances if all(i["state"] == "ready" for i in instances) else None

    def events(self) -> list[dict[str, Any]]:
        path = self.run_dir / "logs" / "controller.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stable_pid(rh: Rolehost, probe: Probe, killed: int | None) -> int:
    """The pid of the instance once its host has reported and been ready long enough."""

    def check() -> int | None:
        instance = rh.instances()[0]
        pid, since = instance["pid"], instance["ready_since"]
        if instance["state"] != "ready" or pid in (None, killed) or since is None:
            return None
        probe.drain()
        if pid not in probe.seen:
            return None
        ready_for = time.time() - datetime.fromisoformat(since).timestamp()
        if ready_for < STABLE_AFTER + STABLE_MARGIN:
            # Sleep the rest rather than poll: the kill should find the controller idle,
            # not answering a stream of status requests.
            time.sleep(STABLE_AFTER + STABLE_MARGIN - ready_for)
            return None
        return int(pid)

    return wait_until("a stable rolehost instance", STARTUP_TIMEOUT, check, every=0.05)


def bench_rolehost(work: Path, probe: Probe, kills: int, rng: random.Random) -> tuple[
    Latency, dict[str, list[float]]
]:
    result = Latency("rolehost", f'1 instance, stable_after = "{STABLE_AFTER:g}s"')
    rh = Rolehost(work, "respawn", "probe", 1, probe.port)
    kill_times: list[tuple[int, float, float]] = []  # (pid, killed at, replacement reported)
    try:
        rh.start(STARTUP_TIMEOUT)
        killed: int | None = None
        for _ in range(kills):
            pid = stable_pid(rh, probe, killed)
            time.sleep(rng.uniform(0, JITTER))
            before = time.time()
            os.kill(pid, signal.SIGKILL)
            arrived = probe.wait_new(RESPAWN_TIMEOUT)  # the killed pid has reported already
            result.samples.append(arrived - before)
            kill_times.append((pid, before, arrived))
            killed = pid
    except Exception as exc:  # reported; the other measurements still run
        result.error = str(exc)
    finally:
        try:
            rh.stop()
        except Exception as exc:
            result.error = result.error or f"stop: {exc}"
    return result, phases(rh.events(), kill_times)


def phases(events: list[dict[str, Any]], kills: list[tuple[int, float, float]]) -> dict[
    str, list[float]
]:
    """Where each respawn's time went, from the controller's event log.

    For each kill: kill -> `host_exited` (exit seen, tree swept, host reaped, output
    drained) -> `bootstrapping` (back-off decided) -> `starting` (disks prepared, host
    spawned) -> the datagram (interpreter, rolehost.host imports, entry point, on_start).
    """
    stamped = [(datetime.fromisoformat(e["timestamp"]).timestamp(), e) for e in events]
    out: dict[str, list[float]] = {
        "kill -> host_exited": [],
        "host_exited -> bootstrapping": [],
        "bootstrapping -> starting": [],
        "starting -> on_start": [],
        "on_start -> ready (after the datagram)": [],
    }

    def first(event: str, after: float, **fields: Any) -> float | None:
        """When the first `event` with these fields was logged at or after `after`."""
        return next((t for t, e in stamped if t >= after and e["event"] == event
                     and all(e.get(k) == v for k, v in fields.items())), None)

    for pid, killed, reported in kills:
        exited = first("host_exited", 0.0, pid=pid)
        if exited is None:
            continue
        boot = first("state", exited, state="bootstrapping")
        starting = first("state", boot, state="starting") if boot is not None else None
        ready = first("state", starting, state="ready") if starting is not None else None
        if boot is None or starting is None or ready is None:
            continue
        out["kill -> host_exited"].append(exited - killed)
        out["host_exited -> bootstrapping"].append(boot - exited)
        out["bootstrapping -> starting"].append(starting - boot)
        out["starting -> on_start"].append(reported - starting)
        out["on_start -> ready (after the datagram)"].append(ready - reported)
    return out


def idle_rolehost(work: Path, probe: Probe, seconds: float) -> Idle:
    result = Idle("rolehost controller")
    rh = Rolehost(work, "idle", "idle", IDLE_INSTANCES, probe.port)
    try:
        rh.start(STARTUP_TIMEOUT)
        instances = wait_until(f"{IDLE_INSTANCES} ready rolehost instances", STARTUP_TIMEOUT,
                               rh.all_ready, 0.2)
        assert rh.pid is not None
        sample_idle(result, rh.pid, [int(i["pid"]) for i in instances], seconds)
    except Exception as exc:  # reported; the other measurements still run
        result.error = str(exc)
    finally:
        try:
            rh.stop()
        except Exception as exc:
            result.error = result.error or f"stop: {exc}"
    return result


def sample_idle(result: Idle, pid: int, children: list[int], seconds: float) -> None:
    """CPU (cpu_times delta / wall time) and peak RSS of `pid`, over `seconds`."""
    proc = psutil.Process(pid)
    # Startup work (imports, spawning, first status checks) is not idle cost: let it end.
    time.sleep(1.0)
    rss = proc.memory_info().rss
    cpu0, wall0 = proc.cpu_times(), time.monotonic()
    deadline = wall0 + seconds
    while (now := time.monotonic()) < deadline:
        time.sleep(min(RSS_SAMPLE_INTERVAL, deadline - now))
        rss = max(rss, proc.memory_info().rss)
    cpu1, wall1 = proc.cpu_times(), time.monotonic()
    busy = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    result.seconds = wall1 - wall0
    result.cpu_percent = 100.0 * busy / result.seconds
    result.rss_max_mb = rss / 2**20
    result.children_rss_mb = sum(psutil.Process(c).memory_info().rss for c in children) / 2**20


# supervisord.


def supervisor_version() -> str | None:
    try:
        from supervisor.options import VERSION  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(VERSION)


class Supervisord:
    """supervisord in the foreground, a child of the bench, over a generated config."""

    def __init__(self, work: Path, name: str, program: Path, numprocs: int) -> None:
        self.root = work / name
        self.root.mkdir(parents=True)
        self.socket = self.root / "supervisor.sock"
        self.conf = self.root / "supervisord.conf"
        names = "%(program_name)s_%(process_num)02d" if numprocs > 1 else "%(program_name)s"
        self.conf.write_text(textwrap.dedent(f"""\
            [unix_http_server]
            file = {self.socket}
            chmod = 0700

            [supervisord]
            nodaemon = true
            logfile = {self.root}/supervisord.log
            pidfile = {self.root}/supervisord.pid
            childlogdir = {self.root}
            loglevel = info

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [supervisorctl]
            serverurl = unix://{self.socket}

            [program:probe]
            command = {sys.executable} {program}
            numprocs = {numprocs}
            process_name = {names}
            autostart = true
            autorestart = true
            startsecs = 0
            startretries = 3
            stopwaitsecs = 5
            redirect_stderr = true
            stdout_logfile = {self.root}/%(program_name)s_%(process_num)02d.log
            """))
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, numprocs: int) -> None:
        executable = Path(sys.executable).with_name("supervisord")
        argv = [str(executable)] if executable.exists() else [
            sys.executable, "-m", "supervisor.supervisord"]
        with open(self.root / "console.log", "ab") as console:
            self.popen = subprocess.Popen(
                [*argv, "-c", str(self.conf)], env=child_env(), stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT,
            )
        wait_until(f"supervisord and its {numprocs} program(s) running", STARTUP_TIMEOUT,
                   lambda: self.running(numprocs), 0.05)

    def rpc(self) -> Any:
        """A fresh XML-RPC proxy: supervisor's transport keeps a connection that a failed
        call (the socket not there yet) leaves unusable."""
        from xmlrpc.client import ServerProxy

        from supervisor.xmlrpc import SupervisorTransport  # type: ignore[import-untyped]

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return ServerProxy("http://127.0.0.1", transport=transport)

    def running(self, numprocs: int) -> list[dict[str, Any]] | None:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise BenchError(f"supervisord exited with {self.popen.returncode}; see {self.root}")
        if not self.socket.exists():
            return None
        infos: list[dict[str, Any]] = self.rpc().supervisor.getAllProcessInfo()
        if len(infos) == numprocs and all(i["statename"] == "RUNNING" for i in infos):
            return infos
        return None

    def stop(self) -> None:
        if self.popen is None:
            return
        try:
            if self.popen.poll() is None and self.socket.exists():
                self.rpc().supervisor.shutdown()
            self.popen.wait(STOP_TIMEOUT)
        except Exception:  # whatever went wrong, `end` below still ends it
            pass
        finally:
            end(self.popen)


def bench_supervisord(work: Path, probe: Probe, program: Path, kills: int,
                      rng: random.Random) -> Latency:
    result = Latency("supervisord", SUPERVISORD_SETTINGS)
    sv = Supervisord(work, "sv-respawn", program, 1)
    try:
        sv.start(1)
        killed: int | None = None
        for _ in range(kills):

            def started(old: int | None = killed) -> int | None:
                info = sv.running(1)
                pid = int(info[0]["pid"]) if info else None
                probe.drain()
                return pid if pid not in (None, old) and pid in probe.seen else None

            pid = wait_until("the supervised program running", STARTUP_TIMEOUT, started, 0.05)
            time.sleep(rng.uniform(0, JITTER))
            before = time.time()
            os.kill(pid, signal.SIGKILL)
            arrived = probe.wait_new(RESPAWN_TIMEOUT)  # the killed pid has reported already
            result.samples.append(arrived - before)
            killed = pid
    except Exception as exc:  # reported; the other measurements still run
        result.error = str(exc)
    finally:
        sv.stop()
    return result


def idle_supervisord(work: Path, program: Path, seconds: float) -> Idle:
    result = Idle("supervisord")
    sv = Supervisord(work, "sv-idle", program, IDLE_INSTANCES)
    try:
        sv.start(IDLE_INSTANCES)
        assert sv.popen is not None
        infos = sv.running(IDLE_INSTANCES) or []
        sample_idle(result, sv.popen.pid, [int(i["pid"]) for i in infos], seconds)
    except Exception as exc:  # reported; the other measurements still run
        result.error = str(exc)
    finally:
        sv.stop()
    return result


# The floor.


def bench_spawn(name: str, settings: str, probe: Probe, program: Path, kills: int) -> Latency:
    """Popen -> datagram, `kills` times; each program is killed once it has reported."""
    result = Latency(name, settings)
    try:
        for _ in range(kills):
            before = time.time()
            child = subprocess.Popen([sys.executable, str(program)], env=child_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            try:
                arrived = probe.wait_pid(child.pid, RESPAWN_TIMEOUT)
                result.samples.append(arrived - before)
            finally:
                child.kill()
                child.wait(10)
    except Exception as exc:  # reported; the other measurements still run
        result.error = str(exc)
    return result


# Report.


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def targets(results: Results) -> list[tuple[str, str, str]]:
    by_name = {r.name: r for r in results.respawn}
    rh, sv, floor = (by_name.get(n) for n in ("rolehost", "supervisord", "bare spawn"))
    idle = results.idle[0] if results.idle else None

    def ratio(a: Latency | None, b: Latency | None) -> float | None:
        if a is None or b is None or a.p50 is None or not b.p50:
            return None
        return a.p50 / b.p50

    vs_sv, vs_floor = ratio(rh, sv), ratio(rh, floor)
    cpu = idle.cpu_percent if idle else None
    rss = idle.rss_max_mb if idle else None
    return [
        (f"rolehost respawn p50 <= {TARGET_VS_SUPERVISORD:g} x supervisord's",
         "-" if vs_sv is None else f"{vs_sv:.3f} x",
         verdict(None if vs_sv is None else vs_sv <= TARGET_VS_SUPERVISORD)),
        (f"rolehost respawn p50 <= {TARGET_VS_FLOOR:g} x bare spawn p50",
         "-" if vs_floor is None else f"{vs_floor:.2f} x",
         verdict(None if vs_floor is None else vs_floor <= TARGET_VS_FLOOR)),
        (f"controller idle CPU <= {TARGET_IDLE_CPU:g} % of a core",
         "-" if cpu is None else f"{cpu:.2f} %",
         verdict(None if cpu is None else cpu <= TARGET_IDLE_CPU)),
        (f"controller idle RSS <= {TARGET_IDLE_RSS_MB:g} MB",
         "-" if rss is None else f"{rss:.1f} MB",
         verdict(None if rss is None else rss <= TARGET_IDLE_RSS_MB)),
    ]


def markdown(results: Results) -> str:
    m = results.machine
    lines = [
        "## Machine", "",
        "| nproc | Python | supervisord | rolehost | platform |",
        "| --- | --- | --- | --- | --- |",
        f"| {m['nproc']} | {m['python']} | {m['supervisord']} | {m['rolehost']} "
        f"| {m['platform']} |", "",
        f"## Respawn latency: SIGKILL -> the replacement's first statement ({results.kills} "
        "kills each)", "",
        "| what | n | p50 ms | p95 ms | min ms | max ms | settings |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.respawn:
        low = min(r.samples) if r.samples else None
        high = max(r.samples) if r.samples else None
        settings = r.settings + (f" **error: {r.error}**" if r.error else "")
        lines.append(f"| {r.name} | {len(r.samples)} | {ms(r.p50)} | {ms(r.p95)} | {ms(low)} "
                     f"| {ms(high)} | {settings} |")
    if any(results.phases.values()):
        lines += ["", "### Where rolehost's respawn time goes (controller.log)", "",
                  "| phase | n | p50 ms | p95 ms |", "| --- | ---: | ---: | ---: |"]
        for phase, samples in results.phases.items():
            view = Latency(phase, "", samples)
            lines.append(f"| {phase} | {len(samples)} | {ms(view.p50)} | {ms(view.p95)} |")
    lines += ["", f"## Idle cost: {IDLE_INSTANCES} idle children, the supervising process", "",
              "| what | seconds | CPU % of one core | RSS max MB | children's RSS MB (total) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for i in results.idle:
        cpu = "-" if i.cpu_percent is None else f"{i.cpu_percent:.2f}"
        rss = "-" if i.rss_max_mb is None else f"{i.rss_max_mb:.1f}"
        kids = "-" if i.children_rss_mb is None else f"{i.children_rss_mb:.1f}"
        name = i.name + (f" **error: {i.error}**" if i.error else "")
        lines.append(f"| {name} | {i.seconds:.1f} | {cpu} | {rss} | {kids} |")
    lines += ["", "## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {t} | {v} | **{ok}** |" for t, v, ok in targets(results)]
    lines += closing_sections(
        [], results.survivors,
        "No process started by the bench (rolehost, supervisord or their children) "
        "survived: checked with psutil by environment token.")
    return "\n".join(lines)


def run(kills: int, idle_seconds: float, keep: bool) -> Results:
    results = Results(machine({"python": platform.python_version(),
                                "supervisord": supervisor_version() or "not installed"}), kills)
    rng = random.Random(1)  # the same pauses before kills on every run
    has_supervisor = supervisor_version() is not None
    # Short: the control socket's path must fit a sockaddr_un.
    work = Path(tempfile.mkdtemp(prefix="rh-bench-", dir="/tmp"))
    probe = Probe()
    try:
        program = work / "probe.py"
        program.write_text(probe_program(probe.port))
        heavy = work / "probe_imports.py"
        heavy.write_text(probe_program(probe.port, "import rolehost.host  # noqa: F401\n"))

        print(f"respawn: rolehost ({kills} kills)...", file=sys.stderr)
        latency, results.phases = bench_rolehost(work, probe, kills, rng)
        results.respawn.append(latency)
        if has_supervisor:
            print(f"respawn: supervisord ({kills} kills)...", file=sys.stderr)
            results.respawn.append(bench_supervisord(work, probe, program, kills, rng))
        else:
            results.respawn.append(Latency("supervisord", "-", error="supervisor not installed"))
        print("respawn: bare spawn...", file=sys.stderr)
        results.respawn.append(bench_spawn(
            "bare spawn", "Popen([python, probe.py]), same program", probe, program, kills))
        results.respawn.append(bench_spawn(
            "bare spawn + import rolehost.host", "diagnostic: the host's imports alone",
            probe, heavy, kills))

        print(f"idle: rolehost ({idle_seconds:g}s)...", file=sys.stderr)
        results.idle.append(idle_rolehost(work, probe, idle_seconds))
        if has_supervisor:
            print(f"idle: supervisord ({idle_seconds:g}s)...", file=sys.stderr)
            results.idle.append(idle_supervisord(work, program, idle_seconds))
    finally:
        results.survivors = kill_ours()
        probe.close()
        leave(work, keep)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=40, help="kills per contender (>= 30)")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="how long to sample each idle supervisor")
    parser.add_argument("--json", type=Path, help="also write the results, raw samples too")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (definitions, configs, logs)")
    args = parser.parse_args()
    if args.kills < 1 or args.idle_seconds <= 0:
        parser.error("--kills and --idle-seconds must be positive")

    with sigterm_as_exit():
        results = run(args.kills, args.idle_seconds, args.keep)
    print(markdown(results))
    if args.json:
        data = asdict(results)
        for entry in data["respawn"]:
            latency = Latency(**entry)
            entry.update(p50=latency.p50, p95=latency.p95)
        data["targets"] = [dict(zip(("target", "measured", "verdict"), t, strict=True))
                           for t in targets(results)]
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
