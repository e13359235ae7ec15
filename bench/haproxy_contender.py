"""HAProxy as bench/balancer.py's third contender, beside rolehost's relay and nginx.

HAProxy in the foreground (`-db`), a child of the bench, relays to the same two instances
(their private ports) with one thread, as nginx runs one worker: the data plane a user
who needs C in front gets with `balancer = "external"` (docs/external-balancer.md). The
bench's service keeps rolehost's own balancer, so HAProxy checks the instances itself
(a connect check every 500 ms) rather than asking an agent: the figures are HAProxy's
relay, the same for either.
"""

from __future__ import annotations

import re
import signal
import subprocess
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
from common import BenchError, child_env, wait_until

HAPROXY_TIMEOUT = 15.0  # up and answering, or gone after SIGUSR1 / SIGTERM


def haproxy_settings() -> str:
    return ("nbthread 1 (one thread, as nginx's one worker); mode http; http-reuse always "
            "(idle server connections kept and shared); balance roundrobin; check inter "
            "500ms; retries 3, option redispatch 1, retry-on conn-failure empty-response "
            "(what `rolehost export haproxy` writes); no logs")


class Haproxy:
    """HAProxy over a generated config, on `port`, relaying to `upstreams`."""

    def __init__(self, work: Path, port: int, upstreams: list[int], binary: str) -> None:
        self.root = work / "haproxy"
        self.root.mkdir(parents=True)
        self.port, self.binary = port, binary
        self.conf = self.root / "haproxy.cfg"
        self.console = self.root / "console.log"
        servers = "\n".join(f"    server web{n} 127.0.0.1:{p} check inter 500ms"
                            for n, p in enumerate(upstreams))
        self.conf.write_text(textwrap.dedent("""\
            global
                nbthread 1
                log stderr format short local0 warning

            defaults
                mode http
                log global
                timeout connect 2s
                timeout client 60s
                timeout server 60s
                timeout queue 10s
                retries 3
                option redispatch 1

            frontend web
                bind 127.0.0.1:{port}
                default_backend web

            backend web
                balance roundrobin
                http-reuse always
                retry-on conn-failure empty-response
            """).format(port=port) + servers + "\n")
        self.popen: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()

    def start(self, http_get: Callable[[int], tuple[int, bytes] | None]) -> None:
        check = subprocess.run([self.binary, "-c", "-f", str(self.conf)], capture_output=True,
                               text=True, timeout=30, env=child_env())
        if check.returncode != 0:
            raise BenchError(f"haproxy -c failed: {check.stdout.strip()} {check.stderr.strip()}")
        with open(self.console, "ab") as console:
            self.popen = subprocess.Popen([self.binary, "-db", "-f", str(self.conf)],
                                          env=child_env(), stdin=subprocess.DEVNULL,
                                          stdout=console, stderr=subprocess.STDOUT)
        self.pids.add(self.popen.pid)
        def answering() -> bool | None:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise BenchError(f"haproxy exited with {self.popen.returncode}; see {self.root}")
            answer = http_get(self.port)
            return True if answer is not None and answer[0] == 200 else None

        wait_until("haproxy to answer", HAPROXY_TIMEOUT, answering, 0.1)

    def processes(self) -> list[psutil.Process]:
        if self.popen is None:
            return []
        try:
            return [psutil.Process(self.popen.pid)]
        except psutil.Error:
            return []

    def log_size(self) -> int:
        return self.console.stat().st_size if self.console.exists() else 0

    def server_events(self, offset: int) -> dict[str, int]:
        """What HAProxy logged about its servers since `offset`, by kind."""
        if not self.console.exists():
            return {}
        with open(self.console, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        kinds: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("<"):  # the syslog copy of a line printed once already
                continue
            if match := re.search(r"Server web/web\d+ is (UP|DOWN)", line):
                kinds[f"server {match.group(1)}"] += 1
            elif "has no server available" in line:
                kinds["no server available"] += 1
        return dict(kinds)

    def stop(self) -> None:
        """SIGUSR1 (soft stop: in-flight requests finish), then SIGTERM and SIGKILL."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGUSR1)
        try:
            self.popen.wait(HAPROXY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
