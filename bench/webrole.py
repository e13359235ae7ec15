"""A FastAPI app as a rolehost web role against the same app in gunicorn behind nginx.

    python bench/webrole.py [--seconds 10] [--keep]

- rolehost: the app as a site (`[roles.web.site] asgi = ...`), 2 instances, each its
  host serving it in uvicorn, behind the built-in balancer;
- gunicorn: 2 uvicorn workers (`-k uvicorn.workers.UvicornWorker`) behind nginx (one
  worker process, keep-alive to gunicorn, the settings balancer.py uses).

Throughput: wrk, 2 threads and 32 keep-alive connections, in ABBA rounds (rolehost,
gunicorn, gunicorn, rolehost) so that the machine's drift hits both. Restarts: steady
keep-alive load (rolehost.testing.LoadProbe, 8 clients) through a restart of each
instance (`rolehost restart web/0`, then web/1, each awaited) and, for gunicorn, through
`kill -HUP` of its master (it starts new workers and stops the old ones gracefully),
awaited until both old workers are gone; failed requests are counted.

Prints a Markdown report. Needs nginx and wrk (Debian packages) and gunicorn (the
`bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from balancer import WRK_SCRIPT, Nginx
from common import (
    BenchError,
    Controller,
    child_env,
    closing_sections,
    free_port,
    http_get,
    kill_ours,
    load_average,
    machine,
    sigterm_as_exit,
    wait_until,
)

from rolehost.testing import LoadProbe

WORKERS = 2
CONNECTIONS = 32
LOAD_CLIENTS = 8
ROUNDS = ("rolehost", "gunicorn", "gunicorn", "rolehost")
START_TIMEOUT = 60.0
RESTART_TIMEOUT = 60.0
LOAD_BEFORE = 200  # requests served before the first restart, and after the last

APP = textwrap.dedent('''\
    """The app both contenders serve: a lifespan that fills a catalog, JSON answers."""
    import contextlib

    from fastapi import FastAPI

    catalog = {}


    @contextlib.asynccontextmanager
    async def lifespan(app):
        catalog.update({f"item-{i}": i * 1.5 for i in range(20)})
        yield


    app = FastAPI(lifespan=lifespan)


    @app.get("/")
    async def index():
        return {"items": len(catalog), "first": catalog["item-1"]}


    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}
    ''')


@dataclass
class Wrk:
    contender: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class Restart:
    contender: str
    how: str
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    p99_ms: float = 0.0


def wrk(contender: str, port: int, seconds: float, script: Path) -> Wrk:
    argv = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency", "-s",
            str(script), f"http://127.0.0.1:{port}/"]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                          timeout=seconds + 30, stdin=subprocess.DEVNULL)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return Wrk(contender, rps=data["requests"] / (data["duration_us"] / 1e6),
               p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
               errors={k: int(data[k]) for k in ("connect", "read", "write", "status",
                                                  "timeout") if data[k]})


class Gunicorn:
    """gunicorn with WORKERS uvicorn workers, a child of the bench."""

    def __init__(self, app: Path, port: int) -> None:
        self.port, self.log = port, app.parent / "gunicorn.log"
        self.argv = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-k",
                     "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}",
                     "--graceful-timeout", "10", "--chdir", str(app), "webapp:app"]
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(self.argv, env=child_env(), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        wait_until("gunicorn to answer", START_TIMEOUT, lambda: True if (
            a := http_get(self.port)) is not None and a[0] == 200 else None, 0.1)
        wait_until("both workers", START_TIMEOUT, lambda: True if len(self.workers())
                   == WORKERS else None, 0.1)

    def workers(self) -> set[int]:
        assert self.popen is not None
        try:
            return {p.pid for p in psutil.Process(self.popen.pid).children()}
        except psutil.Error:
            return set()

    def reload(self) -> None:
        """kill -HUP: new workers, the old ones stopped gracefully; return when the old
        are gone and the new ones answer."""
        assert self.popen is not None
        old = self.workers()
        os.kill(self.popen.pid, signal.SIGHUP)
        wait_until("the old workers gone, new ones up", RESTART_TIMEOUT, lambda: True if (
            (now := self.workers()) and not (now & old) and len(now) == WORKERS) else None, 0.1)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def rolehost_service(work: Path, port: int) -> Controller:
    app = work / "rolehost" / "app"
    app.mkdir(parents=True)
    (app / "webapp.py").write_text(APP)
    return Controller(work / "rolehost", textwrap.dedent(f"""\
        [service]
        name = "webbench"
        upgrade_domains = {WORKERS}

        [roles.web]
        app = "app"
        instances = {WORKERS}
        stop_timeout = "20s"

        [roles.web.site]
        asgi = "webapp:app"
        warmup = ["/"]

        [roles.web.endpoints.http]
        port = {port}
        drain_timeout = "10s"
        probe = {{ path = "/healthz", interval = "500ms" }}
        """), client_timeout=10.0)


def through(contender: str, how: str, port: int, action: Any) -> Restart:
    result = Restart(contender, how)
    with LoadProbe(f"http://127.0.0.1:{port}/", clients=LOAD_CLIENTS) as load:
        load.wait_requests(LOAD_BEFORE)
        began = time.monotonic()
        action()
        result.seconds = time.monotonic() - began
        load.wait_requests(load.requests + LOAD_BEFORE)
    result.requests, result.failures = load.requests, list(load.failures)
    result.p99_ms = load.percentile(99) * 1000
    return result


def ready(rh: Controller) -> bool | None:
    instances = rh.instances()
    return True if len(instances) == WORKERS and all(
        i["state"] == "ready" and i["endpoints"]["http"].get("in_rotation")
        for i in instances) else None


def run(seconds: float, keep: bool) -> str:
    work = Path(tempfile.mkdtemp(prefix="webrole-bench-"))
    ports = {"rolehost": free_port(), "gunicorn": free_port(), "nginx": free_port()}
    (work / "gunicorn").mkdir()
    (work / "gunicorn" / "webapp.py").write_text(APP)
    script = work / "report.lua"
    script.write_text(WRK_SCRIPT)
    rh = rolehost_service(work, ports["rolehost"])
    gunicorn = Gunicorn(work / "gunicorn", ports["gunicorn"])
    nginx = Nginx(work, ports["nginx"], free_port(), [ports["gunicorn"]], CONNECTIONS)
    fronts = {"rolehost": ports["rolehost"], "gunicorn": ports["nginx"]}
    runs: list[Wrk] = []
    restarts: list[Restart] = []
    errors: list[str] = []
    survivors: list[str] = []
    try:
        rh.start(START_TIMEOUT)
        wait_until("both instances in rotation", START_TIMEOUT, lambda: ready(rh), 0.2)
        gunicorn.start()
        nginx.start()
        for contender in ("rolehost", "gunicorn"):  # warm-up, not reported
            wrk(contender, fronts[contender], 2, script)
        runs = [wrk(c, fronts[c], seconds, script) for c in ROUNDS]

        def restart_each() -> None:
            for name in ("web/0", "web/1"):
                rh.cli("restart", name, "--wait", timeout=RESTART_TIMEOUT)
                wait_until("back in rotation", RESTART_TIMEOUT, lambda: ready(rh), 0.1)

        restarts.append(through("rolehost", "`rolehost restart --wait` web/0, then web/1",
                                fronts["rolehost"], restart_each))
        restarts.append(through("gunicorn", "`kill -HUP` of the master (both workers "
                                "replaced)", fronts["gunicorn"], gunicorn.reload))
    except BenchError as exc:
        errors.append(str(exc))
    finally:
        nginx.stop()
        gunicorn.stop()
        try:
            rh.stop()
        except BenchError as exc:
            errors.append(str(exc))
        survivors = kill_ours(lambda p: p.pid in nginx.pids)
        if keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return report(runs, restarts, errors, survivors, seconds)


def report(runs: list[Wrk], restarts: list[Restart], errors: list[str],
           survivors: list[str], seconds: float) -> str:
    lines = ["## A FastAPI app: rolehost web role against gunicorn behind nginx: "
             "`bench/webrole.py`", "", "| | |", "| --- | --- |"]
    details = {"load average at the end": load_average()}
    lines += [f"| {k} | {v} |" for k, v in machine(details).items()]
    lines += ["", f"Throughput: wrk -t2 -c{CONNECTIONS}, {seconds:g} s per round, rounds "
              f"{', '.join(ROUNDS)}.", "",
              "| contender | round req/s | mean req/s | p50 ms | p99 ms | wrk errors |",
              "| --- | --- | --- | --- | --- | --- |"]
    for contender in ("rolehost", "gunicorn"):
        mine = [r for r in runs if r.contender == contender]
        if not mine:
            continue
        mean = sum(r.rps for r in mine) / len(mine)
        lines.append(
            f"| {contender} | {', '.join(f'{r.rps:,.0f}' for r in mine)} | {mean:,.0f} | "
            f"{max(r.p50_ms for r in mine):.2f} | {max(r.p99_ms for r in mine):.2f} | "
            f"{sum(sum(r.errors.values()) for r in mine)} |")
    lines += ["", f"Restarts under keep-alive load ({LOAD_CLIENTS} clients):", "",
              "| contender | what | seconds | requests | failed | p99 ms under load |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.contender} | {r.how} | {r.seconds:.1f} | {r.requests} | "
              f"{len(r.failures)} | {r.p99_ms:.1f} |" for r in restarts]
    for r in restarts:
        lines += [f"- {r.contender} failure: {f}" for f in r.failures[:5]]
    return "\n".join(lines + closing_sections(
        errors, survivors, "Everything was stopped gracefully; no process of the bench was "
        "left.")) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk round")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    with sigterm_as_exit():
        print(run(args.seconds, args.keep))


if __name__ == "__main__":
    main()
