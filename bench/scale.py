"""How the controller scales with the number of instances, on one machine.

    python bench/scale.py [--sizes 10,50,100,200,300,500] [--walk-max 500] [--json out.json]
                          [--profile N] [--no-bare] [--keep]

For each N, in one run, a service of N instances of a tiny role (on_start returns True,
run waits for the stop; no endpoint):

- all ready: the time from `rolehost start --detach` to every instance ready, against N
  bare interpreters that import rolehost (`python -c "import rolehost.host"`), started
  together, to their exit;
- the controller's RSS and CPU: CPU per instance during the start, RSS and CPU idle (a
  10 s window once every instance has been ready for 5 s, with no request to the API);
- `rolehost status --json`: the CLI's wall time (a process started each time), and the
  control API's own answer (`Client.status`), p50 of 7 each; beside them, an interpreter
  that does nothing (`python -c pass`), started the same way: the floor under the CLI's;
- a host-os walk (N <= --walk-max): its time per update domain, and the overhead per
  update domain beyond one instance's restart (a restart of tiny/0 through the API, waited
  for, at that N);
- the event loop's lag: the round trip of the cheapest control API request
  (`GET /v1/instances/tiny_IN_0`), sampled every 100 ms while idle, during the start and
  during the walk.

`--profile N` also records the controller with py-spy at size N: during the start
(start.speedscope.json), idle after the idle CPU's window (idle.speedscope.json, 20 s) and
during the stop (stop.speedscope.json). `--no-bare` skips the bare interpreters (a
profile's run: the ratio is then not measured).
Figures are reported against the issue's targets; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
import psutil
from common import (
    BenchError,
    Controller,
    child_env,
    closing_sections,
    cpu_seconds,
    load_average,
    machine,
    over_sizes,
    verdict,
    wait_until,
)

SIZES = (10, 50, 100, 200, 300, 500)
UPDATE_DOMAINS = 5
IDLE_SECONDS = 10.0
SETTLE_SECONDS = 5.0
SAMPLES = 7
LAG_EVERY = 0.1

ROLE = textwrap.dedent('''\
    from rolehost import RoleEntryPoint, RoleEnvironment


    class Tiny(RoleEntryPoint):
        def on_start(self) -> bool:
            return True

        def run(self) -> None:
            RoleEnvironment.wait_for_stop()
    ''')


def definition(n: int) -> str:
    return textwrap.dedent(f"""\
        [service]
        name = "scale{n}"
        upgrade_domains = {UPDATE_DOMAINS}
        ready_deadline = "10m"

        [roles.tiny]
        entry_point = "tiny:Tiny"
        app = "app"
        instances = {n}
        stop_timeout = "10s"
        """)


@dataclass
class Size:
    n: int
    bare_s: float = 0.0
    ready_s: float = 0.0
    start_cpu_s: float = 0.0
    rss_mb: float = 0.0
    idle_cpu_pct: float = 0.0
    status_cli_ms: float = 0.0
    status_api_ms: float = 0.0
    status_floor_ms: float = 0.0  # `python -c pass`: the interpreter's own start
    restart_s: float | None = None
    walk_s: float | None = None
    stop_s: float | None = None  # `rolehost stop`, all N at once
    stop_error: str | None = None  # a stop that failed or was cut short: how many, why
    lag_idle_ms: dict[str, float] = field(default_factory=dict)
    lag_start_ms: dict[str, float] = field(default_factory=dict)
    lag_walk_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.ready_s / self.bare_s if self.bare_s else None

    @property
    def walk_overhead_s(self) -> float | None:
        """Per update domain, beyond one instance's own restart."""
        if self.walk_s is None or self.restart_s is None:
            return None
        return self.walk_s / UPDATE_DOMAINS - self.restart_s


def bare(n: int) -> float:
    """N interpreters importing what a host imports, started together, to the last exit."""
    began = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "import rolehost.host"], env=child_env(),
                              stdin=subprocess.DEVNULL) for _ in range(n)]
    for proc in procs:
        proc.wait(600)
    return time.perf_counter() - began


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    return {"p50": 1000 * statistics.median(ordered),
            "p99": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max": 1000 * ordered[-1]}


class Lag:
    """Samples the round trip of the cheapest API request from a thread."""

    def __init__(self, rh: Controller, name: str) -> None:
        self.rh, self.name, self.samples = rh, name, list[float]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(LAG_EVERY):
            began = time.perf_counter()
            with contextlib.suppress(Exception):
                self.rh.client.instance(self.name)
                self.samples.append(time.perf_counter() - began)

    def __enter__(self) -> Lag:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def all_ready(rh: Controller, n: int) -> bool | None:
    instances = rh.client.status()["instances"]
    return True if len(instances) == n and all(i["back"] for i in instances) else None


def profile(rh: Controller, work: Path, name: str,
            seconds: float = 60) -> subprocess.Popen[bytes] | None:
    """py-spy records the controller (until terminated, or `seconds`) into
    NAME.speedscope.json; without --idle: what runs, not where the loop waits."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists() or rh.pid is None:
        return None
    return subprocess.Popen([str(py_spy), "record", "--pid", str(rh.pid), "--rate", "100",
                             "--nonblocking", "--format", "speedscope", "--output",
                             str(work / f"{name}.speedscope.json"), "--duration",
                             str(int(seconds))],
                            env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def measure(work: Path, n: int, walk: bool, profiled: bool, with_bare: bool = True) -> Size:
    size = Size(n)
    size.bare_s = bare(n) if with_bare else 0.0
    root = work / f"n{n}"
    (root / "app").mkdir(parents=True)
    (root / "app" / "tiny.py").write_text(ROLE)
    rh = Controller(root, definition(n), client_timeout=120.0)
    try:
        began = time.perf_counter()
        rh.start(timeout=120)
        controller = psutil.Process(rh.pid)
        spy = profile(rh, work, "start") if profiled else None
        with Lag(rh, "tiny_IN_0") as lag:
            wait_until(f"{n} instances ready", 600, lambda: all_ready(rh, n), 0.5)
        size.ready_s = time.perf_counter() - began
        size.start_cpu_s = cpu_seconds([controller])
        size.lag_start_ms = percentiles(lag.samples)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT, not SIGTERM
            spy.wait(30)
        time.sleep(SETTLE_SECONDS)  # the start's stragglers (the standby host, timers)
        # Idle CPU with nothing asking (the lag sampler's requests cost CPU too), then
        # the idle lag.
        cpu0, t0 = cpu_seconds([controller]), time.perf_counter()
        time.sleep(IDLE_SECONDS)
        size.idle_cpu_pct = 100 * (cpu_seconds([controller]) - cpu0) / (time.perf_counter() - t0)
        if profiled and (spy := profile(rh, work, "idle", 20)) is not None:
            spy.wait(60)
        with Lag(rh, "tiny_IN_0") as lag:
            time.sleep(IDLE_SECONDS / 2)
        size.lag_idle_ms = percentiles(lag.samples)
        size.rss_mb = controller.memory_info().rss / 2**20
        cli, api, floor = [], [], []
        for _ in range(SAMPLES):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=child_env(), check=True,
                           stdin=subprocess.DEVNULL, timeout=120)
            floor.append(time.perf_counter() - t)
            t = time.perf_counter()
            rh.cli("status", "--json", timeout=120)
            cli.append(time.perf_counter() - t)
            t = time.perf_counter()
            rh.client.status()
            api.append(time.perf_counter() - t)
        size.status_cli_ms = 1000 * statistics.median(cli)
        size.status_api_ms = 1000 * statistics.median(api)
        size.status_floor_ms = 1000 * statistics.median(floor)
        if walk:
            t = time.perf_counter()
            rh.client.maintain("restart", ["tiny/0"], wait=True)  # the API: no CLI start
            size.restart_s = time.perf_counter() - t
            with Lag(rh, "tiny_IN_1") as lag:
                t = time.perf_counter()
                rh.client.upgrade("host-os")
                wait_until("the walk", 1800, lambda: True if rh.client.walk()["state"] in (
                    "succeeded", "failed", "aborted") else None, 0.5)
                size.walk_s = time.perf_counter() - t
            size.lag_walk_ms = percentiles(lag.samples)
    except Exception as exc:  # reported; the other sizes still run
        size.error = f"{type(exc).__name__}: {exc}"
    finally:
        spy = profile(rh, work, "stop") if profiled else None
        try:
            t = time.perf_counter()
            rh.stop()
            size.stop_s = time.perf_counter() - t
        except BenchError as exc:  # the figures stand; the stop is reported beside them
            size.stop_s = time.perf_counter() - t
            lines = str(exc).splitlines()
            cut = sum("did not stop" in line for line in lines)
            size.stop_error = (f"{cut} instances did not stop within stop_timeout"
                               if cut else lines[0])
        if spy is not None:
            spy.wait(120)  # py-spy ends with the controller, and writes its file
    return size


def slope(sizes: list[Size], value: str) -> float | None:
    """Least-squares growth of `value` per instance over the sizes measured."""
    points = [(s.n, getattr(s, value)) for s in sizes if s.error is None]
    if len(points) < 2:
        return None
    mean_n = statistics.mean(p[0] for p in points)
    mean_v = statistics.mean(p[1] for p in points)
    den = sum((p[0] - mean_n) ** 2 for p in points)
    return sum((p[0] - mean_n) * (p[1] - mean_v) for p in points) / den if den else None


def markdown(sizes: list[Size], details: dict[str, str], errors: list[str],
             survivors: list[str]) -> str:
    lag = lambda d: f"{d.get('p50', 0):.1f} / {d.get('max', 0):.0f}" if d else "-"  # noqa: E731
    lines = ["# Scale: N instances of a tiny role on one machine", "",
             "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in details.items()), "",
             "| N | bare s | all ready s | ratio | start CPU ms/inst | idle RSS MB | idle CPU % "
             "| status CLI ms | python -c pass ms | status API ms | restart s | walk s/UD "
             "| overhead s/UD "
             "| lag idle p50/max ms | lag start | lag walk | stop s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sizes:
        if s.error:
            lines.append(f"| {s.n} | **{s.error}** |" + " |" * 15)
            continue
        walk_ud = None if s.walk_s is None else s.walk_s / UPDATE_DOMAINS
        lines.append(
            f"| {s.n} | {s.bare_s:.2f} | {s.ready_s:.2f} | {s.ratio or 0:.2f} x "
            f"| {1000 * s.start_cpu_s / s.n:.1f} | {s.rss_mb:.1f} | {s.idle_cpu_pct:.2f} "
            f"| {s.status_cli_ms:.0f} | {s.status_floor_ms:.0f} | {s.status_api_ms:.0f} "
            f"| {'-' if s.restart_s is None else f'{s.restart_s:.2f}'} "
            f"| {'-' if walk_ud is None else f'{walk_ud:.2f}'} "
            f"| {'-' if s.walk_overhead_s is None else f'{s.walk_overhead_s:.2f}'} "
            f"| {lag(s.lag_idle_ms)} | {lag(s.lag_start_ms)} | {lag(s.lag_walk_ms)} "
            f"| {'-' if s.stop_s is None else f'{s.stop_s:.1f}'}"
            f"{f' ({s.stop_error})' if s.stop_error else ''} |")
    rss, cpu = slope(sizes, "rss_mb"), slope(sizes, "start_cpu_s")
    lines += ["", f"Slopes (least squares over the sizes): RSS "
              f"{'-' if rss is None else f'{rss:.3f}'} MB per instance; the controller's CPU "
              f"from its start to all ready {'-' if cpu is None else f'{1000 * cpu:.1f}'} ms "
              "per instance (`start CPU ms/inst` includes its own imports, about 0.35 s).",
              "", "## Targets", "",
              "| target | measured | verdict |", "| --- | --- | --- |"]
    by_n = {s.n: s for s in sizes if s.error is None}
    for n in (300, 500):
        if n in by_n and by_n[n].ratio is not None:
            ratio = by_n[n].ratio
            lines.append(f"| all ready <= 1.2 x bare at {n} | {ratio:.2f} x "
                         f"| **{verdict(ratio <= 1.2)}** |")
    if 500 in by_n:
        s = by_n[500]
        lines.append(f"| status p50 <= 100 ms at 500 (CLI / API) | {s.status_cli_ms:.0f} / "
                     f"{s.status_api_ms:.0f} ms | **{verdict(s.status_cli_ms <= 100)}** "
                     f"(API: {verdict(s.status_api_ms <= 100)}) |")
        lines.append(f"| idle CPU <= 1 % of a core at 500 | {s.idle_cpu_pct:.2f} % "
                     f"| **{verdict(s.idle_cpu_pct <= 1)}** |")
    if rss is not None:
        lines.append(f"| RSS <= 0.3 MB per instance beyond the base | {rss:.3f} MB "
                     f"| **{verdict(rss <= 0.3)}** |")
    lines += closing_sections(errors, survivors, "every controller was stopped with `rolehost "
                              "stop`; no process the bench started survived (psutil, by "
                              "environment token).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--walk-max", type=int, default=500,
                        help="walk host-os only at sizes up to this (default 500)")
    parser.add_argument("--profile", type=int, default=0,
                        help="py-spy the controller's start at this size (speedscope file)")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare interpreters (the ratio is not measured)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    common.STOP_TIMEOUT = 600.0  # a stop of 500 instances at once, on a busy machine
    details = machine({"load average at start (1/5/15 min)": load_average(),
                       "update domains": str(UPDATE_DOMAINS)})
    run = over_sizes(
        "scale", [int(s) for s in args.sizes.split(",")],
        lambda work, n: measure(work, n, n <= args.walk_max, n == args.profile,
                                not args.no_bare),
        details, args.keep or bool(args.profile))
    print(markdown(run.results, details, run.errors, run.survivors))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in run.results], indent=2) + "\n")
    if args.profile:
        print(f"profiles: {run.work}/{{start,idle,stop}}.speedscope.json", file=sys.stderr)


if __name__ == "__main__":
    main()
