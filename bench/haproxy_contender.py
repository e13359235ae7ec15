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
import textwrap
from collections import Counter
from pathlib import Path

from common import Foreground, log_since, log_size

HAPROXY_TIMEOUT = 15.0  # up and answering, or gone after SIGUSR1 / SIGTERM


def haproxy_settings() -> str:
    return ("nbthread 1 (one thread, as nginx's one worker); mode http; http-reuse always "
            "(idle server connections kept and shared); balance roundrobin; check inter "
            "500ms; retries 3, option redispatch 1, retry-on conn-failure empty-response "
            "(what `rolehost export haproxy` writes); no logs")


class Haproxy(Foreground):
    """HAProxy over a generated config, on `port`, relaying to `upstreams`; stopped with
    SIGUSR1 (soft stop: in-flight requests finish)."""

    def __init__(self, work: Path, port: int, upstreams: list[int], binary: str) -> None:
        super().__init__("haproxy", work / "haproxy", port, signal.SIGUSR1, HAPROXY_TIMEOUT)
        self.binary = binary
        self.conf = self.root / "haproxy.cfg"
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

    def start(self) -> None:
        self.check([self.binary, "-c", "-f", str(self.conf)])
        self.launch([self.binary, "-db", "-f", str(self.conf)])

    def log_size(self) -> int:
        return log_size(self.console)

    def server_events(self, offset: int) -> dict[str, int]:
        """What HAProxy logged about its servers since `offset`, by kind."""
        kinds: Counter[str] = Counter()
        for line in log_since(self.console, offset).splitlines():
            if line.startswith("<"):  # the syslog copy of a line printed once already
                continue
            if match := re.search(r"Server web/web\d+ is (UP|DOWN)", line):
                kinds[f"server {match.group(1)}"] += 1
            elif "has no server available" in line:
                kinds["no server available"] += 1
        return dict(kinds)
