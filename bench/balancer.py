"""The built-in balancer against nginx and HAProxy: throughput, latency, failed requests
under restarts.

    python bench/balancer.py [--seconds S] [--rounds N] [--throughput-only] [--json out.json]
                             [--pin] [--profile | --no-profile] [--no-https] [--keep]

One rolehost service (2 instances of a tiny keep-alive web role) is started with
`rolehost start --detach`; nginx is then configured as a reverse proxy to the same two
instances (their private ports, read from `rolehost status --json`), so both contenders
relay to the very same processes. HAProxy (bench/haproxy_contender.py) is the third
column, configured the same way.

1. Throughput and latency: wrk with the same settings against the rolehost balancer and
   against nginx, alternately (rolehost, nginx, nginx, rolehost) after a warm-up of each;
   the CPU each proxy and the backends consumed is measured with psutil per run. Then
   the same for https (unless --no-https): a second endpoint of the service with
   protocol = "https", against an nginx server block with `ssl` over the same upstreams,
   one certificate for both (trustme, made for the run), wrk keeping its connections.
2. Failed requests: steady load from `rolehost.testing.LoadProbe` (exact failure counts
   and causes) while each instance in turn is restarted (`rolehost restart web/N --wait`,
   graceful: the balancer drains first), then while each instance's host is SIGKILLed and
   comes back; the same through nginx, whose upstreams are the same instances, with its
   defaults (max_fails=1 fail_timeout=10s) and through a second server block with
   max_fails=0.
3. If a target is missed (or with --profile), py-spy samples the controller while wrk
   runs through the balancer, and the report lists where the time goes.

Everything the bench starts carries a token in its environment; at the end it looks with
psutil for any survivor (and for nginx's processes, whose environment nginx rewrites),
kills it and reports it. Figures are reported against the targets; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from common import (
    Controller,
    Foreground,
    child_env,
    closing_sections,
    cpu_seconds,
    free_port,
    http_get,
    kill_ours,
    leave,
    load_average,
    log_since,
    log_size,
    machine,
    sigterm_as_exit,
    verdict,
    wait_until,
)
from haproxy_contender import Haproxy, haproxy_settings

from rolehost.testing import LoadProbe

INSTANCES = 2
WRK_THREADS = 2
WRK_CONNECTIONS = 32
WARMUP_SECONDS = 3.0
# ABCCBA: a drift of the machine within a round hits all three alike.
ROUNDS = ("rolehost", "nginx", "haproxy", "haproxy", "nginx", "rolehost")
CONTENDERS = ("rolehost", "nginx", "haproxy")
LOAD_CLIENTS = 8  # LoadProbe threads during restarts and kills
LOAD_BEFORE = 200  # requests served before the first disruption, and after the last
SETTLE = 1.0  # seconds of load between one instance back in rotation and the next action
STABLE_AFTER = 1.0  # [service] stable_after: a kill after this long restarts at once

STARTUP_TIMEOUT = 60.0  # the controller up and every instance ready and in rotation
READY_TIMEOUT = 30.0  # an instance ready and in rotation again after a restart or a kill
RESTART_TIMEOUT = 60.0  # one `rolehost restart --wait`
NGINX_TIMEOUT = 15.0  # nginx up and answering, or gone after SIGQUIT
LOAD_TIMEOUT = 30.0  # LoadProbe reaching a request count
WRK_GRACE = 30.0  # on top of --seconds, before a wrk run is called hung

TARGET_RPS = 0.9  # rolehost requests/s >= 0.9 x nginx's
TARGET_P99 = 1.5  # rolehost p99 <= 1.5 x nginx's

ROLE = textwrap.dedent('''\
    """A tiny keep-alive web role: GET anything -> 200 "hello" (6 bytes, Content-Length).

    GET /__connections answers how many connections the instance has accepted so far.
    """

    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rolehost import RoleEntryPoint, RoleEnvironment

    RESPONSE = (b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n"
                b"Content-Length: 6\\r\\n\\r\\nhello\\n")


    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True
        server: "Server"

        def setup(self) -> None:
            super().setup()
            with self.server.lock:
                self.server.accepted += 1

        def do_GET(self) -> None:
            if self.path == "/__connections":
                body = str(self.server.accepted).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
                                 % (len(body), body))
                return
            self.wfile.write(RESPONSE)  # one write: no Nagle / delayed-ACK stall

        def log_message(self, format: str, *args: object) -> None:
            pass


    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # listen backlog; socketserver's 5 drops SYNs under a burst
        accepted = 0
        lock = threading.Lock()


    class Web(RoleEntryPoint):
        def on_start(self) -> bool:
            # Every input endpoint (http, and https when the bench has it: the balancer
            # terminates TLS, the instance serves http on that endpoint's port too).
            self.servers = []
            for endpoint in RoleEnvironment.current_instance.endpoints.values():
                server = Server((endpoint.host, endpoint.port), Handler)
                threading.Thread(target=server.serve_forever, daemon=True).start()
                self.servers.append(server)
            return True

        def on_stop(self) -> None:
            for server in self.servers:
                server.shutdown()
                server.server_close()  # new connections are refused from here on
    ''')

# wrk prints this line at the end (latencies in microseconds), so nothing is scraped.
WRK_SCRIPT = textwrap.dedent("""\
    done = function(summary, latency, requests)
      local e = summary.errors
      io.write(string.format(
        "BENCH_JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, "
        .. "\\"p50_us\\": %d, \\"p90_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d, "
        .. "\\"mean_us\\": %.1f, \\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, "
        .. "\\"status\\": %d, \\"timeout\\": %d}\\n",
        summary.requests, summary.duration, summary.bytes,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
        latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
    end
    """)


def haproxy_binary() -> str:
    """Debian puts haproxy in /usr/sbin, off a user's PATH."""
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


@dataclass
class Certificate:
    """An https endpoint's port, and a certificate for 127.0.0.1 made for the run
    (trustme): both proxies serve the same chain and key."""

    port: int
    chain: Path
    key: Path

    @classmethod
    def make(cls, folder: Path, port: int) -> Certificate:
        import trustme

        folder.mkdir(parents=True)
        issued = trustme.CA().issue_cert("127.0.0.1")
        chain, key = folder / "chain.pem", folder / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        return cls(port, chain, key)


def accepted(ports: list[int]) -> int | None:
    """Connections the backends have accepted so far, this question's own included."""
    total = 0
    for port in ports:
        answer = http_get(port, "/__connections")
        if answer is None or answer[0] != 200:
            return None
        total += int(answer[1])
    return total


# Results.


@dataclass
class WrkRun:
    contender: str
    label: str  # "warm-up" or "run N"
    seconds: float
    connections: int  # wrk's -c
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # wrk's socket errors and non-2xx
    proxy_cpu_s: float = 0.0  # the balancer's process (controller), or nginx's master+worker
    backends_cpu_s: float = 0.0  # the two instances' host processes
    wrk_cpu_s: float = 0.0
    backend_connections: int | None = None  # connections the backends accepted meanwhile
    error: str | None = None

    @property
    def proxy_us_per_request(self) -> float | None:
        return self.proxy_cpu_s / self.requests * 1e6 if self.requests else None

    @property
    def backends_us_per_request(self) -> float | None:
        return self.backends_cpu_s / self.requests * 1e6 if self.requests else None


@dataclass
class Action:
    what: str  # "restart web/0", "SIGKILL web/1 (pid 123)"
    seconds: float  # until the instance was ready and in rotation again


@dataclass
class Disruption:
    contender: str
    scenario: str  # "restart" or "SIGKILL"
    requests: int = 0
    failures: int = 0
    causes: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    seconds: float = 0.0
    failing_seconds: float = 0.0  # total of the 50 ms slices in which failures were counted
    actions: list[Action] = field(default_factory=list)
    proxy_saw: dict[str, int] = field(default_factory=dict)  # rolehost events / nginx errors
    error: str | None = None


@dataclass
class Summary:
    contender: str
    runs: int
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_us_per_request: float | None
    backends_us_per_request: float | None


@dataclass
class Profile:
    seconds: float
    rate: int
    samples: int  # samples with the controller's thread on CPU (py-spy leaves out idle ones)
    rps: float  # wrk's figure during the profile (py-spy slows the controller a little)
    requests: int = 0
    backend_connections: int | None = None
    self_by_function: list[tuple[str, float]] = field(default_factory=list)  # % of samples
    total_by_function: list[tuple[str, float]] = field(default_factory=list)
    self_by_file: list[tuple[str, float]] = field(default_factory=list)
    svg: str | None = None
    error: str | None = None


@dataclass
class Results:
    machine: dict[str, str]
    settings: dict[str, str]
    wrk: list[WrkRun] = field(default_factory=list)
    disruptions: list[Disruption] = field(default_factory=list)
    profile: Profile | None = None
    survivors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # whatever stopped a whole phase
    connections: int = WRK_CONNECTIONS  # wrk's, in the throughput runs

    def round_ratios(self, other: str = "nginx") -> list[float]:
        """Per round of ROUNDS: rolehost's requests/s over `other`'s. A drift of the
        machine within a round hits all alike."""
        runs = [r for r in self.wrk if r.label.startswith("run ")
                and r.contender in CONTENDERS]
        ratios = []
        for start in range(0, len(runs) - len(ROUNDS) + 1, len(ROUNDS)):
            quartet = runs[start:start + len(ROUNDS)]
            if any(r.error is not None for r in quartet):
                continue
            ours = sum(r.rps for r in quartet if r.contender == "rolehost")
            theirs = sum(r.rps for r in quartet if r.contender == other)
            if theirs:
                ratios.append(ours / theirs)
        return ratios

    def summary(self, contender: str) -> Summary | None:
        runs = [r for r in self.wrk
                if r.contender == contender and r.label != "warm-up" and r.error is None]
        if not runs:
            return None
        requests = sum(r.requests for r in runs)
        proxy = sum(r.proxy_cpu_s for r in runs)
        backends = sum(r.backends_cpu_s for r in runs)
        return Summary(
            contender, len(runs),
            rps=statistics.median(r.rps for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            proxy_us_per_request=proxy / requests * 1e6 if requests else None,
            backends_us_per_request=backends / requests * 1e6 if requests else None,
        )


# Process hygiene.


def ours_too(work: Path, nginx_pids: set[int]) -> Callable[[psutil.Process], bool]:
    """Processes of this run without the token: nginx rewrites its workers' environment and
    title, so a command line naming the work folder, or a pid we recorded (nginx's master
    and workers)."""

    def match(proc: psutil.Process) -> bool:
        cmdline = " ".join(proc.cmdline())
        return (proc.pid in nginx_pids and "nginx" in cmdline) or str(work) in cmdline

    return match


def pin(pids: list[int], cpus: str) -> None:
    """Every thread of each process onto `cpus` (threads they start later inherit it)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True,
                       timeout=10, check=False)


# rolehost.


class Rolehost(Controller):
    """The service under test: a controller over a generated two-instance definition."""

    def __init__(self, work: Path, port: int, https: Certificate | None = None) -> None:
        app = work / "rolehost" / "app"
        app.mkdir(parents=True)
        (app / "web_role.py").write_text(ROLE)
        self.port = port
        self.https = https
        extra = "" if https is None else textwrap.dedent(f"""
            [roles.web.endpoints.https]
            port = {https.port}
            protocol = "https"
            certificate = "{https.chain}"
            key = "{https.key}"
            drain_timeout = "10s"
            probe = {{ path = "/healthz", interval = "500ms", timeout = "1s", healthy = 1, unhealthy = 2 }}
            """)  # noqa: E501
        super().__init__(work / "rolehost", textwrap.dedent(f"""\
            [service]
            name = "balbench"
            upgrade_domains = {INSTANCES}
            stable_after = "{STABLE_AFTER:g}s"

            [roles.web]
            entry_point = "web_role:Web"
            app = "app"
            instances = {INSTANCES}
            stop_timeout = "10s"

            [roles.web.endpoints.http]
            port = {port}
            drain_timeout = "10s"
            probe = {{ path = "/healthz", interval = "500ms", timeout = "1s", healthy = 1, unhealthy = 2 }}
            """) + extra, client_timeout=10.0)  # noqa: E501

    def status(self) -> dict[str, Any]:
        """`rolehost status --json`, as the brief asks the ports be read (`instances` asks
        the control API directly: cheaper for polling)."""
        status: dict[str, Any] = json.loads(self.cli("status", "--json", timeout=30))
        return status

    def serving(self) -> list[dict[str, Any]] | None:
        """The instances, once each is ready, in rotation and has been ready STABLE_AFTER."""
        instances = self.instances()
        now = time.time()
        for i in instances:
            since = i["ready_since"]
            if i["state"] != "ready" or not all(
                    e.get("in_rotation") for e in i["endpoints"].values()) or (
                    since is None or now - datetime.fromisoformat(since).timestamp()
                    < STABLE_AFTER + 0.2):
                return None
        return instances

    def idle(self) -> bool | None:
        """True once the balancer holds no client connection."""
        balancers = self.client.status()["balancers"]
        return True if all(b["connections"] == 0 for b in balancers) else None

    def events(self, since: int) -> list[dict[str, Any]]:
        return self.client.events(since)

    def last_seq(self) -> int:
        events = self.client.events(0)
        return int(events[-1]["seq"]) if events else 0


# nginx.


NGINX_FAIL_TIMEOUT = 10.0  # nginx's default fail_timeout, waited out between its rounds
# Idle upstream connections nginx's worker keeps. Its cache is one for both upstreams, so
# with fewer slots than clients x upstreams a request often finds only the other upstream's
# connections idle, opens one and evicts another (about 1,000 new backend connections per
# 10 s run with 32): rolehost keeps every idle connection, per instance. So nginx keeps
# twice as many as wrk has connections.
def nginx_keepalive(connections: int) -> int:
    return 2 * connections


def nginx_settings(upstreams: list[int], connections: int = WRK_CONNECTIONS) -> str:
    servers = ", ".join(f"127.0.0.1:{p}" for p in upstreams)
    return (f"worker_processes 1; upstream {{ {servers}; "
            f"keepalive {nginx_keepalive(connections)}; "
            "keepalive_requests "
            "1000000 }; proxy_http_version 1.1; proxy_set_header Connection keep-alive; "
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header "
            "X-Forwarded-Proto $scheme (the three headers rolehost sends, so the instances "
            "parse the same requests from both); "
            "keepalive_requests 1000000 (client side); access_log off. Defaults otherwise: "
            "proxy_next_upstream error timeout (a GET that fails on one upstream before its "
            "response header is passed to the other), max_fails=1 fail_timeout=10s (one "
            "failure takes an upstream out for 10 s), proxy_buffering on, tcp_nodelay on. A "
            "second server block, used only for the failure rounds ('nginx max_fails=0'), "
            "proxies to the same two instances with max_fails=0 (never taken out)")


class Nginx(Foreground):
    """nginx in the foreground (`daemon off`), a child of the bench, over a generated config;
    stopped with SIGQUIT (graceful).

    Two server blocks relay to the same two instances: `port` with nginx's defaults for
    failures (max_fails=1 fail_timeout=10s), `retry_port` with max_fails=0.
    """

    def __init__(self, work: Path, port: int, retry_port: int, upstreams: list[int],
                 connections: int = WRK_CONNECTIONS, https: Certificate | None = None) -> None:
        super().__init__("nginx", work / "nginx", port, signal.SIGQUIT, NGINX_TIMEOUT)
        self.retry_port = retry_port
        self.conf = self.root / "nginx.conf"
        self.error_log = self.root / "error.log"
        temp = "\n".join(f"    {kind}_temp_path {self.root}/{kind}_temp;"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        blocks = []
        for name, listen, extra in (("web", port, ""), ("web_retry", retry_port, " max_fails=0")):
            servers = "\n".join(f"        server 127.0.0.1:{p}{extra};" for p in upstreams)
            blocks.append(textwrap.dedent("""\
                upstream {name} {{
            {servers}
                    keepalive {keepalive};
                    keepalive_requests 1000000;
                }}

                server {{
                    listen 127.0.0.1:{listen};
                    location / {{
                        proxy_pass http://{name};
                        proxy_http_version 1.1;
                        proxy_set_header Connection keep-alive;
                        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                        proxy_set_header X-Forwarded-Proto $scheme;
                    }}
                }}
            """).format(name=name, servers=servers, listen=listen,
                        keepalive=nginx_keepalive(connections)))
        self.tls_port: int | None = None
        if https is not None:  # TLS terminated, then the same upstream as `port`
            self.tls_port = free_port()
            blocks.append(textwrap.dedent(f"""\
                server {{{{
                    listen 127.0.0.1:{self.tls_port} ssl;
                    ssl_certificate {https.chain};
                    ssl_certificate_key {https.key};
                    ssl_protocols TLSv1.2 TLSv1.3;
                    location / {{{{
                        proxy_pass http://web;
                        proxy_http_version 1.1;
                        proxy_set_header Connection keep-alive;
                        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                        proxy_set_header X-Forwarded-Proto $scheme;
                    }}}}
                }}}}
            """).replace("{{", "{").replace("}}", "}"))
        self.conf.write_text(textwrap.dedent("""\
            worker_processes 1;
            daemon off;
            pid {root}/nginx.pid;
            error_log {root}/error.log warn;

            events {{
                worker_connections 1024;
            }}

            http {{
                access_log off;
                keepalive_requests 1000000;
            {temp}

            """).format(root=self.root, temp=temp) + "\n".join(blocks) + "}\n")

    def argv(self, *extra: str) -> list[str]:
        return ["nginx", "-p", f"{self.root}/", "-e", str(self.error_log), "-c", str(self.conf),
                *extra]

    def start(self) -> None:
        self.check(self.argv("-t"))
        self.launch(self.argv())

    def error_log_size(self) -> int:
        return log_size(self.error_log)

    def upstream_errors(self, offset: int) -> dict[str, int]:
        """What nginx logged about its upstreams since `offset`, by kind."""
        kinds: Counter[str] = Counter()
        for line in log_since(self.error_log, offset).splitlines():
            match = re.search(r"\[(?:error|warn)\] \d+#\d+: \*\d+ (.+?) while ", line)
            if match:
                kinds[match.group(1)] += 1
            elif "no live upstreams" in line:
                kinds["no live upstreams"] += 1
        return dict(kinds)


# wrk.


def wrk_argv(port: int, seconds: float, connections: int, script: Path, pinned: bool,
             scheme: str = "http") -> list[str]:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "-s", str(script), f"{scheme}://127.0.0.1:{port}/"]
    return ["taskset", "-c", "0", *argv] if pinned else argv


def run_wrk(run: WrkRun, port: int, script: Path, proxy: list[psutil.Process],
            backends: list[psutil.Process], ports: list[int], pinned: bool,
            scheme: str = "http") -> WrkRun:
    """One wrk run; fills `run` in (its `error` says what went wrong, if anything did)."""
    connections0 = accepted(ports)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proxy0, backends0 = cpu_seconds(proxy), cpu_seconds(backends)
    try:
        done = subprocess.run(wrk_argv(port, run.seconds, run.connections, script, pinned,
                                       scheme),
                              env=child_env(),
                              capture_output=True, text=True, timeout=run.seconds + WRK_GRACE,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        run.error = f"wrk did not finish within {run.seconds + WRK_GRACE:g}s"
        return run
    run.proxy_cpu_s = cpu_seconds(proxy) - proxy0
    run.backends_cpu_s = cpu_seconds(backends) - backends0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.wrk_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    connections1 = accepted(ports)
    if connections0 is not None and connections1 is not None:
        run.backend_connections = connections1 - connections0 - len(ports)  # not the asking
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        run.error = f"wrk failed ({done.returncode}): {(done.stderr or done.stdout).strip()}"
        return run
    data = json.loads(line.removeprefix("BENCH_JSON "))
    run.requests = int(data["requests"])
    run.rps = run.requests / (data["duration_us"] / 1e6)
    run.p50_ms, run.p90_ms = data["p50_us"] / 1000, data["p90_us"] / 1000
    run.p99_ms, run.max_ms = data["p99_us"] / 1000, data["max_us"] / 1000
    run.errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")
                  if data[k]}
    return run


# The phases.


@dataclass
class Contender:
    name: str
    port: int
    proxy: Callable[[], list[psutil.Process]]
    scheme: str = "http"
    endpoint: str = "http"  # rolehost's endpoint whose private ports the backends count on


def throughput(results: Results, contenders: dict[str, Contender], rh: Rolehost, seconds: float,
               script: Path, pinned: bool, rounds: int = 1) -> None:
    instances = rh.instances()
    backends = [psutil.Process(int(i["pid"])) for i in instances]

    def ports(c: Contender) -> list[int]:
        return [int(i["endpoints"][c.endpoint]["port"]) for i in instances]

    names = [n for n in CONTENDERS if n in contenders]
    https = [n for n in ("rolehost https", "nginx https") if n in contenders]
    if pinned:
        pin([p.pid for c in contenders.values() for p in c.proxy()] + [p.pid for p in backends],
            "1")
    try:
        for name in names + https:
            print(f"throughput: warm-up {name} ({WARMUP_SECONDS:g}s)...", file=sys.stderr)
            c = contenders[name]
            results.wrk.append(run_wrk(
                WrkRun(name, "warm-up", WARMUP_SECONDS, results.connections), c.port, script,
                c.proxy(), backends, ports(c), pinned, c.scheme))
        # The https pair in its own ABBA rounds, after the http ones.
        order = [*ROUNDS * rounds,
                 *([f"{n} https" for n in ROUNDS] * rounds if https else [])]
        for n, name in enumerate(order, 1):
            print(f"throughput: run {n}/{len(order)} {name} ({seconds:g}s)...", file=sys.stderr)
            c = contenders[name]
            results.wrk.append(run_wrk(
                WrkRun(name, f"run {n}", seconds, results.connections), c.port, script,
                c.proxy(), backends, ports(c), pinned, c.scheme))
    finally:
        if pinned:
            every = f"0-{(os.cpu_count() or 1) - 1}"
            pin([p.pid for c in contenders.values() for p in c.proxy()]
                + [p.pid for p in backends], every)


def disrupt(contender: Contender, scenario: str, rh: Rolehost, nginx: Nginx,
            haproxy: Haproxy) -> Disruption:
    """Steady load through `contender` while each instance in turn is restarted or killed."""
    result = Disruption(contender.name, scenario)
    wait_until("every instance ready and in rotation", READY_TIMEOUT, rh.serving, 0.1)
    # The previous load's connections gone: what they log as they close is not this round's.
    wait_until("no client connection left on the balancer", READY_TIMEOUT, rh.idle, 0.1)
    seq, log_offset = rh.last_seq(), nginx.error_log_size()
    haproxy_offset = haproxy.log_size()
    began = time.monotonic()
    load = LoadProbe(f"http://127.0.0.1:{contender.port}/", clients=LOAD_CLIENTS)
    sampling = threading.Event()
    failing: list[float] = []  # one entry per 50 ms slice in which failures were counted

    def sample() -> None:
        seen, then = 0, time.monotonic()
        while not sampling.wait(0.05):
            now, count = time.monotonic(), len(load.failures)
            if count > seen:
                failing.append(now - then)
            seen, then = count, now

    sampler = threading.Thread(target=sample, daemon=True)
    load.start()
    sampler.start()
    try:
        load.wait_requests(LOAD_BEFORE, LOAD_TIMEOUT)
        for index in range(INSTANCES):
            name = f"web/{index}"
            t0 = time.monotonic()
            if scenario == "restart":
                rh.cli("restart", name, "--wait", timeout=RESTART_TIMEOUT)
                what = f"rolehost restart {name} --wait"
            else:
                pid = int(rh.instances()[index]["pid"])
                os.kill(pid, signal.SIGKILL)
                what = f"SIGKILL {name} (host pid {pid})"

                def replaced(index: int = index, pid: int = pid) -> bool | None:
                    i = rh.instances()[index]
                    return True if i["state"] == "ready" and i["pid"] not in (None, pid) \
                        else None

                wait_until(f"{name} ready in a new host", READY_TIMEOUT, replaced, 0.05)

            def in_rotation(index: int = index) -> bool | None:
                return True if rh.instances()[index]["endpoints"]["http"].get("in_rotation") \
                    else None

            wait_until(f"{name} in rotation", READY_TIMEOUT, in_rotation, 0.05)
            result.actions.append(Action(what, time.monotonic() - t0))
            time.sleep(SETTLE)
            if scenario == "SIGKILL" and index + 1 < INSTANCES:  # no back-off for the next
                wait_until("every instance stable", READY_TIMEOUT, rh.serving, 0.1)
        load.wait_requests(load.requests + LOAD_BEFORE, LOAD_TIMEOUT)
    except Exception as exc:  # reported; the other measurements still run
        result.error = str(exc)
    finally:
        load.stop()
        sampling.set()
        sampler.join(5)
        result.seconds = time.monotonic() - began
        result.failing_seconds = sum(failing)
    report = load.report()
    result.requests, result.failures = int(report["requests"]), int(report["failures"])
    result.causes = dict(Counter(load.failures))
    result.p50_ms, result.p99_ms = float(report["p50_ms"]), float(report["p99_ms"])
    result.max_ms = max(load.latencies, default=0.0) * 1000
    if contender.name == "rolehost":
        kinds = ("retry", "backend_failed", "drain_timeout", "rotation")
        seen = Counter(e["event"] for e in rh.events(seq) if e["event"] in kinds)
        result.proxy_saw = {f"{k} events": seen[k] for k in kinds if seen[k]}
    elif contender.name == "haproxy":
        result.proxy_saw = haproxy.server_events(haproxy_offset)
    else:
        result.proxy_saw = nginx.upstream_errors(log_offset)
    return result


# Profiling.


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def frame_name(frame: str) -> tuple[str, str]:
    """('function (short/file.py)', 'short/file.py') from py-spy's 'function (path)'."""
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame, "?"
    function, path = match.groups()
    parts = Path(path).parts
    if "rolehost" in parts:
        short = "/".join(parts[parts.index("rolehost"):])
    elif "asyncio" in parts:
        short = "/".join(parts[parts.index("asyncio"):])
    else:
        short = "/".join(parts[-2:])
    return f"{function} ({short})", short


# The frames every event-loop stack goes through: on nearly every sample, they say nothing.
TRUNK_FILES = ("<frozen runpy>", "click/core.py", "rolehost/__main__.py", "cli/service.py",
               "asyncio/runners.py")
TRUNK_FUNCTIONS = ("BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete",
                   "BaseEventLoop._run_once", "Handle._run")


def trunk(frame: str) -> bool:
    return frame.startswith(TRUNK_FUNCTIONS) or frame.endswith(
        tuple(f"({f})" for f in TRUNK_FILES))



def analyse(collapsed: str, profile: Profile, top: int = 15) -> None:
    """Self and inclusive shares from py-spy's collapsed stacks ('a;b;c N' per line)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    files: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += n
        own[frames[-1][0]] += n
        files[frames[-1][1]] += n
        for name in {f[0] for f in frames}:
            total[name] += n
    profile.samples = samples
    if samples:
        profile.self_by_function = [(k, 100 * v / samples) for k, v in own.most_common(top)]
        inner = [(k, v) for k, v in total.most_common() if not trunk(k)]
        profile.total_by_function = [(k, 100 * v / samples) for k, v in inner[:top]]
        profile.self_by_file = [(k, 100 * v / samples) for k, v in files.most_common(top)]


def profile_balancer(work: Path, rh: Rolehost, port: int, seconds: float, connections: int,
                     script: Path, keep: bool) -> Profile:
    rate = 200
    result = Profile(seconds, rate, 0, 0.0)
    py_spy = find_py_spy()
    if py_spy is None:
        result.error = "py-spy is not installed (pip install py-spy)"
        return result
    assert rh.pid is not None
    raw, svg = work / "profile.txt", work / "profile.svg"
    spies = []
    try:
        for out, fmt in ((raw, "raw"), (svg, "flamegraph")) if keep else ((raw, "raw"),):
            spies.append(subprocess.Popen(
                [py_spy, "record", "--pid", str(rh.pid), "--rate", str(rate), "--nonblocking",
                 "--nolineno", "--format", fmt, "--output", str(out),
                 "--duration", f"{max(1, round(seconds))}"],
                env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE))
        time.sleep(1.0)  # py-spy attached
        instances = rh.instances()
        run = run_wrk(WrkRun("rolehost", "profiled", max(1.0, seconds - 2), connections), port,
                      script,
                      [psutil.Process(rh.pid)],
                      [psutil.Process(int(i["pid"])) for i in instances],
                      [int(i["endpoints"]["http"]["port"]) for i in instances], False)
        result.backend_connections = run.backend_connections
        result.requests = run.requests
        result.rps = run.rps
        for spy in spies:
            try:
                _, stderr = spy.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, stderr = spy.communicate(timeout=10)
            if spy.returncode != 0:
                result.error = f"py-spy failed: {stderr.decode(errors='replace').strip()[-300:]}"
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(10)
    if raw.exists():
        analyse(raw.read_text(), result)
    if keep and svg.exists():
        result.svg = str(svg)
    return result


# Report.


def ratio_text(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} x"


def num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def targets(results: Results) -> list[tuple[str, str, str]]:
    rh, ng = results.summary("rolehost"), results.summary("nginx")
    rps = rh.rps / ng.rps if rh and ng and ng.rps else None
    p99 = rh.p99_ms / ng.p99_ms if rh and ng and ng.p99_ms else None
    failed = {(d.contender, d.scenario): d for d in results.disruptions}
    zero = [d for (c, _), d in failed.items() if c == "rolehost"]
    rows = [
        (f"rolehost requests/s >= {TARGET_RPS:g} x nginx's", ratio_text(rps),
         verdict(None if rps is None else rps >= TARGET_RPS)),
        (f"rolehost p99 <= {TARGET_P99:g} x nginx's", ratio_text(p99),
         verdict(None if p99 is None else p99 <= TARGET_P99)),
    ]
    if zero:
        total = sum(d.failures for d in zero)
        complete = all(d.error is None for d in zero)
        rows.append(("rolehost: 0 failed requests through restarts and SIGKILLs (expected)",
                     f"{total} failed", verdict(total == 0 and complete)))
    return rows


def markdown(results: Results) -> str:
    m, s = results.machine, results.settings
    lines = [
        "# Balancer: rolehost against nginx", "",
        "## Machine", "",
        "| | |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in m.items()), "",
        "## Settings", "",
        "| | |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in s.items()), "",
        f"On {m['nproc']} cores, wrk, the proxy (rolehost's controller or nginx's worker) and "
        "the two Python backends all compete for CPU: every figure below includes that "
        "contention. The CPU columns (psutil, per run) show what each side consumed; "
        "`proxy us/req` is the proxy's own CPU per request, the least noisy comparison.", "",
    ]
    lines += ["## Throughput and latency (wrk, same settings for both)", "",
              "| contender | run | s | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | "
              "mean ms (Little) | errors | proxy CPU s | backends CPU s | wrk CPU s | "
              "proxy us/req | backend conns opened |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
              "| ---: | ---: | ---: | ---: |"]
    for r in results.wrk:
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        if r.error:
            errors = f"**{r.error}**"
        lines.append(
            f"| {r.contender} | {r.label} | {r.seconds:g} | {r.requests} | {r.rps:.0f} "
            f"| {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} "
            f"| {num(r.connections / r.rps * 1000 if r.rps else None, '.2f')} | {errors} "
            f"| {r.proxy_cpu_s:.2f} | {r.backends_cpu_s:.2f} | {r.wrk_cpu_s:.2f} "
            f"| {num(r.proxy_us_per_request, '.0f')} "
            f"| {'-' if r.backend_connections is None else r.backend_connections} |")
    lines += ["", "wrk 4 corrects its latency histogram for coordinated omission: after the run, "
              "each response slower than the mean interval between two requests of one "
              "connection adds synthetic samples for the requests that connection would have "
              "sent meanwhile. So p90/p99 are very sensitive to rare stalls (a dropped SYN "
              "costs 1 s, a backend thread starved of the GIL); `mean ms (Little)` is "
              f"{results.connections} connections / req/s, the real mean time a request took. "
              "`backend conns opened`: connections the two instances accepted during the run "
              "(each counts its own; the health probes' 2 a second are included): a proxy that "
              "reuses its keep-alive connections opens a few, one that does not opens one per "
              "request."]
    rh, ng = results.summary("rolehost"), results.summary("nginx")
    hp = results.summary("haproxy")
    lines += ["", "Summary (median of the measured runs; warm-ups left out):", "",
              "| contender | runs | req/s | p50 ms | p99 ms | proxy CPU us/req | "
              "backends CPU us/req |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rhs, ngs = results.summary("rolehost https"), results.summary("nginx https")
    for sm in (rh, ng, hp, rhs, ngs):
        if sm is not None:
            lines.append(f"| {sm.contender} | {sm.runs} | {sm.rps:.0f} | {sm.p50_ms:.2f} "
                         f"| {sm.p99_ms:.2f} | {num(sm.proxy_us_per_request, '.0f')} "
                         f"| {num(sm.backends_us_per_request, '.0f')} |")
    if rh and ng:
        lines.append(
            f"| **rolehost / nginx** | | **{rh.rps / ng.rps:.2f} x** "
            f"| **{rh.p50_ms / ng.p50_ms:.2f} x** | **{rh.p99_ms / ng.p99_ms:.2f} x** "
            f"| {ratio_text(_div(rh.proxy_us_per_request, ng.proxy_us_per_request), 1)} "
            f"| {ratio_text(_div(rh.backends_us_per_request, ng.backends_us_per_request))} |")
    if rh and hp:
        lines.append(
            f"| **rolehost / haproxy** | | **{rh.rps / hp.rps:.2f} x** "
            f"| **{rh.p50_ms / hp.p50_ms:.2f} x** | **{rh.p99_ms / hp.p99_ms:.2f} x** "
            f"| {ratio_text(_div(rh.proxy_us_per_request, hp.proxy_us_per_request), 1)} "
            f"| {ratio_text(_div(rh.backends_us_per_request, hp.backends_us_per_request))} |")
    if rhs and ngs:
        lines.append(
            f"| **rolehost https / nginx https** | | **{rhs.rps / ngs.rps:.2f} x** "
            f"| **{rhs.p50_ms / ngs.p50_ms:.2f} x** | **{rhs.p99_ms / ngs.p99_ms:.2f} x** "
            f"| {ratio_text(_div(rhs.proxy_us_per_request, ngs.proxy_us_per_request), 1)} "
            f"| {ratio_text(_div(rhs.backends_us_per_request, ngs.backends_us_per_request))} |")
    for other in ("nginx", "haproxy"):
        if ratios := results.round_ratios(other):
            lines += ["", f"Requests/s ratio per round (rolehost's two runs over {other}'s two "
                      f"in one {', '.join(ROUNDS)} round): "
                      + ", ".join(f"{r:.2f} x" for r in ratios) + "."]

    lines += ["", "## Failed requests while each instance is restarted, then SIGKILLed", "",
              f"LoadProbe ({LOAD_CLIENTS} keep-alive clients, GET /) through the contender; "
              f"{LOAD_BEFORE} requests before the first action and after the last; after each "
              f"action the bench waits until the instance is ready and in rotation (rolehost's "
              f"status) and {SETTLE:g} s more. Both contenders relay to the same instances, "
              "restarted and killed the same way through rolehost.", "",
              "| contender | scenario | requests | failed | causes | s with failures | p50 ms "
              "| p99 ms | max ms | s | what the proxy saw | actions (s until back in rotation) |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for d in results.disruptions:
        causes = "; ".join(f"{n} x {c}" for c, n in d.causes.items()) or "-"
        if d.error:
            causes += f" **error: {d.error}**"
        saw = ", ".join(f"{n} x {k}" for k, n in d.proxy_saw.items()) or "-"
        actions = "; ".join(f"{a.what}: {a.seconds:.2f}" for a in d.actions) or "-"
        lines.append(f"| {d.contender} | {d.scenario} | {d.requests} | **{d.failures}** "
                     f"| {causes} | {d.failing_seconds:.2f} | {d.p50_ms:.2f} | {d.p99_ms:.2f} "
                     f"| {d.max_ms:.0f} "
                     f"| {d.seconds:.1f} | {saw} | {actions} |")
    lines += ["", "`s with failures`: the total of the 50 ms slices in which the load saw "
              "failures (a proxy that fails fast fails many requests in little time). `what the "
              "proxy saw`: for rolehost, controller events (`retry`: a request re-sent to the "
              "other instance after its backend failed before answering; `backend_failed`: "
              "a 502 or a closed client connection; `rotation`: in/out of rotation); for "
              "nginx, its error log (upstream errors, each retried on the other upstream when "
              "possible; `no live upstreams`: both taken out by max_fails, an immediate 502)."]

    lines += ["", "## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {t} | {v} | **{ok}** |" for t, v, ok in targets(results)]

    p = results.profile
    if p is not None:
        lines += ["", "## Profile: where the controller's time goes under load", ""]
        if p.error:
            lines.append(f"**{p.error}**")
        if p.samples:
            lines += [
                f"py-spy record at {p.rate} Hz for {p.seconds:g} s on the controller while wrk "
                f"ran through the balancer ({p.rps:.0f} req/s under the profiler; the backends "
                f"accepted {'?' if p.backend_connections is None else p.backend_connections} "
                f"connections for {p.requests} requests); "
                f"{p.samples} on-CPU samples (idle ones left out), "
                f"{100 * p.samples / (p.rate * p.seconds):.0f} % of the wall time. Shares are "
                "of on-CPU samples.", "",
                "Self time includes what a function's C calls and system calls cost (py-spy "
                "without --native). The inclusive list leaves out the trunk every event-loop "
                "stack goes through (runpy, click, asyncio.run, run_forever, _run_once, "
                "Handle._run).", "",
                "| self time: function | % | | inclusive: function | % |",
                "| --- | ---: | --- | --- | ---: |"]
            for a, b in zip(p.self_by_function, p.total_by_function, strict=False):
                lines.append(f"| `{a[0]}` | {a[1]:.1f} | | `{b[0]}` | {b[1]:.1f} |")
            lines += ["", "| self time by file | % |", "| --- | ---: |"]
            lines += [f"| `{f}` | {v:.1f} |" for f, v in p.self_by_file]
            if p.svg:
                lines += ["", f"Flame graph: `{p.svg}`"]

    lines += closing_sections(
        results.errors, results.survivors,
        "nginx was stopped (SIGQUIT) and rolehost with `rolehost stop`; no process "
        "started by the bench (controller, hosts, nginx master and worker, wrk, "
        "py-spy) survived: checked with psutil by environment token, command line and "
        "recorded pids.")
    return "\n".join(lines)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def uvloop_version() -> str:
    """uvloop's version: the controller's event loop when it is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if os.environ.get("ROLEHOST_LOOP") == "asyncio":
            return f"{version('uvloop')}, not used: ROLEHOST_LOOP=asyncio"
        return f"{version('uvloop')} (the controller's event loop)"
    except PackageNotFoundError:
        return "not installed: the controller runs asyncio's own event loop"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_details() -> dict[str, str]:
    """What `machine` lists between the core count and rolehost."""
    from importlib.metadata import version

    return {
        "cpu": cpu_model(),
        "load average at start (1/5/15 min)": load_average(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "nginx": tool_version(["nginx", "-v"]),
        "haproxy": tool_version([haproxy_binary(), "-v"]),
        "wrk": tool_version(["wrk", "-v"]).split(" Copyright")[0],
        "httptools": version("httptools"),
        "uvloop": uvloop_version(),
    }


def run(seconds: float, pinned: bool, profile: bool | None, keep: bool, rounds: int = 1,
        throughput_only: bool = False, connections: int = WRK_CONNECTIONS,
        https: bool = True) -> Results:
    work = Path(tempfile.mkdtemp(prefix="rh-bal-", dir="/tmp"))  # short: socket path limit
    script = work / "report.lua"
    script.write_text(WRK_SCRIPT)
    certificate = Certificate.make(work / "tls", free_port()) if https else None
    rh = Rolehost(work, free_port(), certificate)
    nginx: Nginx | None = None
    haproxy: Haproxy | None = None
    results = Results(machine(machine_details()), {}, connections=connections)
    try:
        print("starting rolehost...", file=sys.stderr)
        rh.start(STARTUP_TIMEOUT)
        wait_until("every instance ready and in rotation", STARTUP_TIMEOUT, rh.serving, 0.1)
        status = rh.status()  # `rolehost status --json`
        ports = [int(i["endpoints"]["http"]["port"]) for i in status["instances"]]
        nginx = Nginx(work, free_port(), free_port(), ports, connections, certificate)
        print("starting nginx...", file=sys.stderr)
        nginx.start()
        haproxy = Haproxy(work, free_port(), ports, haproxy_binary())
        print("starting haproxy...", file=sys.stderr)
        haproxy.start()
        assert rh.pid is not None
        controller = psutil.Process(rh.pid)
        ng, hp = nginx, haproxy
        contenders = {
            "haproxy": Contender("haproxy", hp.port, hp.processes),
            "rolehost": Contender("rolehost", rh.port, lambda: [controller]),
            "nginx": Contender("nginx", ng.port, ng.processes),
            "nginx max_fails=0": Contender("nginx max_fails=0", ng.retry_port, ng.processes),
        }
        if certificate is not None and ng.tls_port is not None:
            contenders["rolehost https"] = Contender("rolehost https", certificate.port,
                                                     lambda: [controller], "https", "https")
            contenders["nginx https"] = Contender("nginx https", ng.tls_port, ng.processes,
                                                  "https")
        results.settings = {
            "load generator": " ".join(wrk_argv(0, seconds, connections, Path("report.lua"),
                                                pinned))
            .replace("127.0.0.1:0", "127.0.0.1:PORT"),
            "order": f"warm-up {WARMUP_SECONDS:g} s each, then {', '.join(ROUNDS)}"
                     + (f", {rounds} times over" if rounds > 1 else ""),
            "pinning": "wrk on CPU 0 (taskset -c 0); proxies and backends on CPU 1 (taskset -a "
                       "-p -c 1)" if pinned else "none: the kernel schedules all on both cores",
            "backends": f"{INSTANCES} instances of a ThreadingHTTPServer role (HTTP/1.1 "
                        "keep-alive, TCP_NODELAY, listen backlog 128), GET / -> 200, 6-byte "
                        "body with Content-Length, one write; private ports "
                        f"{', '.join(map(str, ports))}",
            "rolehost": f"the built-in balancer (controller pid {rh.pid}) on 127.0.0.1:{rh.port}"
                        ", round-robin, probe GET /healthz every 500 ms, drain_timeout 10s, "
                        f"stable_after {STABLE_AFTER:g}s",
            "nginx": f"{tool_version(['nginx', '-v'])} on 127.0.0.1:{ng.port}: "
                     + nginx_settings(ports, connections),
            "haproxy": f"{tool_version([hp.binary, '-v'])} on 127.0.0.1:{hp.port}: "
                       + haproxy_settings(),
        }
        if "rolehost https" in contenders:
            results.settings["https"] = (
                f"rolehost: a second endpoint, protocol = \"https\" on 127.0.0.1:"
                f"{contenders['rolehost https'].port} (the controller's ssl, TLS 1.2+); nginx: "
                f"a server block `listen ... ssl` on 127.0.0.1:{contenders['nginx https'].port}"
                ", ssl_protocols TLSv1.2 TLSv1.3, to the same upstream; one certificate for "
                "127.0.0.1 (trustme, RSA) for both; wrk's connections are kept alive, so the "
                "handshakes are a few, and the figure is the record layer's cost")
        throughput(results, contenders, rh, seconds, script, pinned, rounds)
        nginx_done = 0.0  # when the last round through nginx's defaults ended
        for scenario in () if throughput_only else ("restart", "SIGKILL"):
            for name in ("rolehost", "nginx", "nginx max_fails=0", "haproxy"):
                if name == "nginx":  # its failed upstreams come back after fail_timeout
                    time.sleep(max(0.0, nginx_done + NGINX_FAIL_TIMEOUT - time.monotonic()))
                print(f"failures: {scenario} through {name}...", file=sys.stderr)
                results.disruptions.append(disrupt(contenders[name], scenario, rh, ng, hp))
                if name == "nginx":
                    nginx_done = time.monotonic()
        missed = any(v == "FAIL" for _, _, v in targets(results)[:2])
        if profile or (profile is None and missed):
            print("profiling the controller with py-spy...", file=sys.stderr)
            wait_until("every instance ready and in rotation", READY_TIMEOUT, rh.serving, 0.1)
            results.profile = profile_balancer(work, rh, rh.port, min(seconds, 12.0),
                                               connections, script, keep)
    except Exception as exc:
        results.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if haproxy is not None:
            try:
                haproxy.stop()
            except Exception as exc:
                results.errors.append(f"haproxy stop: {exc}")
        if nginx is not None:
            try:
                nginx.stop()
            except Exception as exc:
                results.errors.append(f"nginx stop: {exc}")
        try:
            rh.stop()
        except Exception as exc:
            results.errors.append(f"rolehost stop: {exc}")
        results.survivors = kill_ours(also=ours_too(
            work, (nginx.pids if nginx else set()) | (haproxy.pids if haproxy else set())))
        results.machine["load average at end (1/5/15 min)"] = load_average()
        leave(work, keep)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="length of each measured wrk run (4 of them; default 15)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the rolehost, nginx, haproxy, haproxy, nginx, rolehost "
                             "order N times "
                             "(default 1); the summary is the median of the runs")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the wrk runs (and the profile): no restarts or kills")
    parser.add_argument("--connections", type=int, default=WRK_CONNECTIONS,
                        help=f"wrk's connections in the throughput runs (default "
                             f"{WRK_CONNECTIONS}); nginx keeps twice as many idle upstream "
                             "connections")
    parser.add_argument("--pin", action="store_true",
                        help="wrk on CPU 0, the proxies and backends on CPU 1 (taskset)")
    parser.add_argument("--no-https", dest="https", action="store_false",
                        help="leave out the https pair (TLS terminated by rolehost, by nginx) "
                             "and its rounds")
    profiling = parser.add_mutually_exclusive_group()
    profiling.add_argument("--profile", dest="profile", action="store_true", default=None,
                           help="always profile the controller with py-spy")
    profiling.add_argument("--no-profile", dest="profile", action="store_false",
                           help="never profile (default: only when a target is missed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (definition, nginx.conf and logs, the "
                             "controller's logs, the profile and its flame graph)")
    args = parser.parse_args()
    if args.seconds < 2:
        parser.error("--seconds must be at least 2")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.connections < WRK_THREADS:
        parser.error(f"--connections must be at least {WRK_THREADS} (wrk's threads)")
    for tool in ("nginx", "wrk") + (("taskset",) if args.pin else ()):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install -y nginx wrk)")
    if not os.access(haproxy_binary(), os.X_OK):
        parser.error("haproxy is not installed (Debian: apt-get install -y haproxy)")

    with sigterm_as_exit():
        results = run(args.seconds, args.pin, args.profile, args.keep, args.rounds,
                      args.throughput_only, args.connections, args.https)
    print(markdown(results))
    if args.json:
        data = asdict(results)
        for entry, r in zip(data["wrk"], results.wrk, strict=True):
            entry.update(proxy_us_per_request=r.proxy_us_per_request,
                         backends_us_per_request=r.backends_us_per_request)
        data["summary"] = {c: asdict(sm) for c in (*CONTENDERS, "rolehost https",
                                                   "nginx https")
                           if (sm := results.summary(c)) is not None}
        data["round_ratios"] = {c: results.round_ratios(c) for c in ("nginx", "haproxy")}
        data["targets"] = [dict(zip(("target", "measured", "verdict"), t, strict=True))
                           for t in targets(results)]
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
