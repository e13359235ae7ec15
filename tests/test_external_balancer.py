"""`balancer = "external"`: rolehost leaves the endpoint's port to the user's balancer,
serves each instance's readiness (HTTP 200/503, HAProxy's agent-check) and drains an
instance before it stops. Debian's HAProxy, with `rolehost export haproxy`'s config, in
front of three instances under keep-alive load loses no request through a host-os walk,
a restart and a SIGKILL."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rolehost.balancer.external import agent_word, established
from rolehost.fabric import ports
from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.cli import rolehost
from support.net import answer_and_body
from support.roles import HTTP_SITE
from support.service import MakeService, Service

SITE = HTTP_SITE + """
class Handler(Site):
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(float(self.path.partition("?")[2]))
        # One write: a SIGKILL between the head and the body would cut a response that
        # no balancer can hide (docs/balancer.md, "What it promises").
        body = RoleEnvironment.current_instance.id.encode()
        head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
        self.wfile.write(head + body)

class Role(RoleEntryPoint):
    def on_start(self):
        self.server = serve(Handler)
        if os.path.exists(RoleEnvironment.get_setting("probe") + ".slow"):
            time.sleep(3)  # in no rotation yet: a request through HAProxy waits
        return True

    def run(self):
        RoleEnvironment.wait_for_stop()

    def on_stop(self):
        self.server.shutdown()
"""


def free_external_port() -> int:
    """An endpoint port whose default instance ports (port + 1 on) and readiness ports
    (port + 1001 on) for three instances are free, below the private range rolehost
    chooses from (30000 on)."""
    for _ in range(200):
        port = random.randrange(20000, 28000)
        with contextlib.ExitStack() as stack:
            try:
                for each in (port, port + 1, port + 2, port + 3, port + 1001, port + 1002,
                             port + 1003):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", each))
            except OSError:
                continue
            return port
    raise RuntimeError("no free ports")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed, and CI is set (.ci/run installs it)")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return found


@contextlib.contextmanager
def running_haproxy(binary: str, config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy in the foreground, its log in haproxy.log beside its config."""
    with (config.parent / "haproxy.log").open("wb") as log, subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT) as process:
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


class Readiness:
    """Polls one readiness port over HTTP from a thread: every (status, body) seen."""

    def __init__(self, port: int) -> None:
        self.port, self.seen = port, set[tuple[int, str]]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.seen.add(answer_and_body(self.port, "/"))

    def __enter__(self) -> Readiness:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"agent\n")
        return s.makefile("rb").readline().decode()


def test_agent_words() -> None:
    assert agent_word(True, "") == "up ready"
    assert agent_word(False, "draining: restart: x") == "drain"
    assert agent_word(False, "busy: warming") == "drain"
    assert agent_word(False, "probe failing: HTTP 503") == "drain"
    assert agent_word(False, "failed") == "maint"
    assert agent_word(False, "bootstrapping") == "down"


def test_established_counts_connections_to_the_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert established(port) == 0
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                assert established(port) == 1
        accepted.close()


@pytest.mark.slow  # about 40 s: a walk, a restart, a kill, a scale out and in, under load
def test_haproxy_in_front_loses_no_request(make_service: MakeService, tmp_path: Path) -> None:
    binary = haproxy_binary()
    port = free_external_port()
    first, ready = port + 1, port + 1001  # the defaults
    service = make_service(
        SITE, instances=3, service={"upgrade_domains": 3}, role={"stop_timeout": "5s"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        balancer = "external"
        drain_timeout = "10s"
        """)
    out = tmp_path / "haproxy"
    # A fourth slot: the scale-out below needs no reload of HAProxy.
    exported = rolehost("export", "haproxy", "-f", str(service.toml), "-o", str(out),
                        "--slots", "4")
    assert exported.returncode == 0, exported.stderr
    config = out / "haproxy.cfg"
    checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with ServiceHarness(service.toml) as h:
        h.wait_ready()
        # The endpoint's port is the user's balancer's: rolehost does not listen on it.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
            pass
        assert answer_and_body(ready, "/") == (200, "in rotation\n")
        assert agent(ready + 1) == "up ready\n"
        status = h.instance("web/2")["endpoints"]["http"]
        assert status["port"] == first + 2
        assert status["readiness"] == f"127.0.0.1:{ready + 2}"

        # An in-flight request straight to web/0's port: its restart drains it first.
        slow = socket.create_connection(("127.0.0.1", first), timeout=30)
        slow.sendall(b"GET /slow?1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: established(first) > 0, 5, "the slow request connected")
        h.restart("web/0")
        assert slow.makefile("rb").readline().startswith(b"HTTP/1.1 200"), \
            "the restart did not wait for the request in flight"
        slow.close()

        with running_haproxy(binary, config) as haproxy, \
                Readiness(ready + 2) as readiness:
            url = f"http://127.0.0.1:{port}/"

            def spread_over(count: int) -> bool:
                seen = {answer_and_body(port, "/")[1] for _ in range(3 * count)}
                return seen == {f"web_IN_{i}" for i in range(count)}

            wait_until(lambda: spread_over(3), 20, "HAProxy to send to all three instances")
            with LoadProbe(url, clients=4) as load:
                load.wait_requests(50)
                walk = h.upgrade("host-os")
                assert walk["state"] == "succeeded", walk
                h.restart("web/1")
                pid = h.kill("web/2")
                h.wait_replaced("web/2", pid)
                h.wait_ready()
                h.scale("web", 4)  # its slot's agent-check brings web/3 in
                wait_until(lambda: spread_over(4), 20, "HAProxy to send to web/3")
                h.scale("web", 3)  # drained through its agent-check, then stopped
                before = load.requests
                load.wait_requests(before + 50)
            assert load.failures == [], load.failures[:5]
            assert load.requests > 200

            # None in rotation: HAProxy holds a request until one is back (the exported
            # Lua action), where it would answer 503 at once.
            Path(f"{service.probe}.slow").touch()
            h.restart("web/0", "web/1", "web/2", wait=False)
            wait_until(lambda: all(answer_and_body(ready + i, "/") == (503, "starting\n")
                                   for i in range(3)), 20, "no instance in rotation")
            assert answer_and_body(port, "/")[0] == 200
            haproxy.terminate()
        statuses = {code for code, _ in readiness.seen}
        bodies = {body for code, body in readiness.seen if code == 503}
        assert {200, 503} <= statuses, readiness.seen
        assert any(b.startswith("draining: restart: walk") for b in bodies), bodies


def test_overlapping_external_ports_name_the_key(make_service: MakeService) -> None:
    service = make_service(SITE, extra="""
        [roles.web.endpoints.http]
        port = 20000
        balancer = "external"
        [roles.web.endpoints.admin]
        port = 20500
        """)
    checked = rolehost("check", "-f", str(service.toml))
    assert checked.returncode == 2, checked
    assert ("roles.web.endpoints.admin.port: port 20500 is already used by "
            "roles.web.endpoints.http.instance_port") in checked.stderr, checked.stderr


WORKER = """
class Worker(RoleEntryPoint):
    def run(self):
        RoleEnvironment.wait_for_stop()
"""


def unbound(*wanted: int) -> bool:
    with contextlib.ExitStack() as stack:
        for port in wanted:
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def crowded_definition(make_service: MakeService, gap: int) -> tuple[Service, range, int]:
    """A web role whose external endpoints' instance ports (fixed, one per instance
    index) cover the whole private range but `gap` ports (returned), and a worker whose
    4 instances each need 2 private ports; and where the first range begins. The ports
    the web role's 2 instances bind (its http instance ports, every endpoint's readiness
    ports) lie below the private range, and are free."""
    span = ports.private_range()
    if len(span) < 1100 or span.start < 8000:
        pytest.skip(f"a private range of {len(span)} ports from {span.start}: too odd here")
    back = next((m for m in range(2, 100) if unbound(span.start - m, span.start - m + 1)), 0)
    first = span.start - back  # web/0 and web/1 bind its first two ports, below the range
    covered = (len(span) + back - gap) // 1000 * 1000  # [first, first + covered)
    first_free = first + covered
    starts = [first + 1000 * i for i in range(covered // 1000)]
    if first_free + gap < span.stop:  # the rest, past the gap, covered too
        starts.append(first_free + gap)
    free = range(first_free, min(first_free + gap, span.stop))
    top = first - 1000 * len(starts) - 10
    readiness = next((r for r in range(top, 1100, -7) if unbound(
        *(r + 1000 * i + n for i in range(len(starts)) for n in (0, 1)))), 0)
    if not back or not readiness:
        pytest.skip("no free ports below the private range for the web role's instances")
    endpoints = "".join(f"""
        [roles.web.endpoints.{"http" if i == 0 else f"x{i}"}]
        port = {readiness - 1 - i}
        balancer = "external"
        instance_port = {start}
        readiness_port = {readiness + 1000 * i}
        """ for i, start in enumerate(starts))
    service = make_service(SITE, instances=2, role={"stop_timeout": "5s"}, extra=endpoints + """
        [roles.worker]
        entry_point = "roles:Worker"
        app = "app"
        instances = 4
        stop_timeout = "5s"
        [roles.worker.internal_endpoints.a]
        [roles.worker.internal_endpoints.b]
        """)
    roles = service.toml.parent / "app" / "roles.py"
    roles.write_text(roles.read_text() + textwrap.dedent(WORKER))
    return service, free, first


def test_fixed_ports_are_never_given_to_another_instance(make_service: MakeService) -> None:
    """An external endpoint's instance ports are fixed by index, and were not in the
    pool that private ports are chosen from: another instance could be given one, and
    then one of the two could not bind it. Now the pool passes over every port the
    definition fixes: here all the private range but 64 ports."""
    service, free, first = crowded_definition(make_service, 64)
    with service.harness() as h:
        status = h.wait_ready(30)
        given = {i["id"]: (i["endpoints"]["a"]["port"], i["endpoints"]["b"]["port"])
                 for i in status["instances"] if i["role"] == "worker"}
        assert len(given) == 4 and all(p in free for pair in given.values() for p in pair), (
            free, given)
        web = [i for i in status["instances"] if i["role"] == "web"]
        assert [i["endpoints"]["http"]["port"] for i in web] == [first, first + 1]
        readiness = web[0]["endpoints"]["http"]["readiness"].rpartition(":")[2]
        assert answer_and_body(int(readiness), "/")[0] == 200


def test_fixed_ports_that_crowd_out_the_private_ones_are_a_definition_error(
        make_service: MakeService) -> None:
    """Fixed ports that leave the instances too few private ports: exit 2, naming them."""
    service, free, first = crowded_definition(make_service, 4)  # the worker's instances need 8
    checked = rolehost("check", "-f", str(service.toml), timeout=60)
    assert checked.returncode == 2, (checked.stdout, checked.stderr)
    span = ports.private_range()
    assert (f"rolehost.toml: roles.web.endpoints.http.instance_port: ports {first}-"
            f"{first + 999} with roles.web.endpoints.x1.instance_port") in checked.stderr
    assert (f"leave {len(free)} of the ports {span.start}-{span.stop - 1}, which instances' "
            "private ports are chosen from, and the instances need 8") in checked.stderr
