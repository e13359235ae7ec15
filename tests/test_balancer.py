"""The readiness-gated balancer, with real sockets and real traffic."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rolehost.balancer import relay_build
from rolehost.fabric.ports import private_range
from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.net import free_port, get
from support.roles import WEB
from support.service import MakeService


def web(make_service: MakeService, instances: int, warmup: str = "0,0,0,0", endpoint: str = "",
        **kwargs: object) -> tuple[ServiceHarness, int]:
    port = free_port()
    service = make_service(
        WEB, instances=instances, settings={"warmup": warmup},
        role={"status_check_interval": "200ms", "stop_timeout": "10s"}, **kwargs,
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        {endpoint}
        """,
    )
    return service.harness(), port


def test_traffic_reaches_only_ready_instances(make_service: MakeService) -> None:
    harness, port = web(make_service, 2, warmup="0,3")
    with harness as h:
        h.wait_state("web/0", "ready", 30)
        assert h.instance("web/1")["state"] == "starting"
        assert {get(port)[1] for _ in range(6)} == {b"web_IN_0"}
        h.wait_ready(30)
        assert {get(port)[1] for _ in range(6)} == {b"web_IN_0", b"web_IN_1"}
        status = h.instance("web/1")["endpoints"]["http"]
        assert status["in_rotation"] and status["served"] >= 1
        # Private ports come from below the ephemeral range (rolehost/fabric/ports.py).
        assert all(i["endpoints"]["http"]["port"] in private_range()
                   for i in h.status()["instances"])
        # The controller says which relay it runs: the one this interpreter would load.
        [started] = [e for e in h.events() if e["event"] == "controller_started"]
        assert started["relay"] == relay_build()


def test_busy_status_check_takes_an_instance_out_and_back(make_service: MakeService) -> None:
    harness, port = web(make_service, 2)
    with harness as h:
        h.wait_ready(30)
        flag = h.definition.parent / "probe.txt.busy"
        flag.touch()  # both instances report busy...
        h.wait_state("web/0", "busy", 10)
        h.wait_state("web/1", "busy", 10)
        endpoint = h.instance("web/0")["endpoints"]["http"]
        assert not endpoint["in_rotation"] and endpoint["why_out"].startswith("busy")
        flag.unlink()  # ...then ready again: back in rotation
        h.wait_ready(10)
        assert get(port)[0] == 200


def test_failing_probe_takes_an_instance_out_and_back(make_service: MakeService) -> None:
    harness, port = web(make_service, 1, endpoint='probe = { path = "/healthz", '
                        'interval = "100ms", healthy = 1, unhealthy = 2 }')
    with harness as h:
        h.wait_ready(30)
        wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["in_rotation"], 10, "rotation")
        sick = h.definition.parent / "probe.txt.sick"
        sick.touch()
        def out_of_rotation() -> dict[str, object] | None:
            endpoint: dict[str, object] = h.instance("web/0")["endpoints"]["http"]
            return None if endpoint["in_rotation"] else endpoint

        out = wait_until(out_of_rotation, 10, "out of rotation")
        assert out["why_out"] == "probe failing: HTTP 503"
        assert h.instance("web/0")["state"] == "ready"  # the instance is fine; its site is not
        sick.unlink()
        wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["in_rotation"], 10, "back")
        assert get(port) == (200, b"web_IN_0")


def test_a_probe_answered_with_garbage_fails_and_probing_goes_on(
        make_service: MakeService) -> None:
    """70,000 bytes without a line end overflow the probe's reader: a failed probe, not
    a probe watch that ends and leaves the rotation where it was."""
    harness, port = web(make_service, 1, endpoint='probe = { path = "/healthz", '
                        'interval = "100ms", healthy = 1, unhealthy = 1 }')
    garbage = harness.definition.parent / "probe.txt.garbage"
    garbage.touch()
    with harness as h:
        h.wait_state("web/0", "ready", 30)  # ready, never in rotation: not back (wait_ready)

        def why_out() -> object:
            return h.instance("web/0")["endpoints"]["http"]["why_out"]

        wait_until(lambda: why_out() == "probe failing: malformed answer", 10,
                   "the probe to fail", lambda: str(h.instance("web/0")))
        garbage.unlink()
        wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["in_rotation"], 10, "back")
        assert get(port) == (200, b"web_IN_0")
        garbage.touch()  # and out again: the probing went on
        wait_until(lambda: why_out() == "probe failing: malformed answer", 10, "out again")


def test_no_instance_ready_waits_then_503(make_service: MakeService) -> None:
    harness, port = web(make_service, 1, warmup="600", endpoint='queue_timeout = "500ms"')
    with harness as h:
        h.wait_state("web/0", "starting", 30)
        began = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")
        response = connection.getresponse()
        waited = time.monotonic() - began
        assert response.status == 503 and response.getheader("Retry-After") == "1"
        assert 0.45 < waited < 3
        assert response.getheader("Connection") is None  # kept alive: it may ask again
        response.read()
        connection.request("GET", "/", headers={"Connection": "close"})
        assert connection.getresponse().getheader("Connection") == "close"
        connection.close()


def test_a_stopping_controller_answers_the_waiting_and_accepts_no_more(
        make_service: MakeService) -> None:
    """`rolehost stop`: a request waiting for an instance gets a 503 it can retry, at
    once; the listener closes; a request in flight still drains."""
    harness, port = web(make_service, 1, endpoint='queue_timeout = "60s"')
    with harness as h:
        h.wait_ready(30)
        slow: list[tuple[int, bytes]] = []
        in_flight = threading.Thread(target=lambda: slow.append(get(port, "/slow?s=6")))
        in_flight.start()
        wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["active"] == 1, 10,
                   "a request in flight")
        (h.definition.parent / "probe.txt.busy").touch()  # out of rotation: the next waits
        h.wait_state("web/0", "busy", 10)
        queued = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            queued.request("GET", "/")
            wait_until(lambda: h.status()["balancers"][0]["connections"] == 2, 10, "queued")
            stopper = threading.Thread(target=h.stop)
            stopper.start()
            response = queued.getresponse()
            assert (response.status, response.getheader("Retry-After")) == (503, "1")
            assert response.read() == b"the service is stopping"
            assert in_flight.is_alive()  # answered at once, not when all was over
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        finally:
            queued.close()
        in_flight.join(30)
        stopper.join(60)
        assert slow == [(200, b"web_IN_0")]


def test_a_request_waits_for_an_instance_to_become_ready(make_service: MakeService) -> None:
    harness, port = web(make_service, 1, warmup="1.5")
    with harness as h:
        h.wait_state("web/0", "starting", 30)
        assert get(port) == (200, b"web_IN_0")  # queued, not refused


def test_a_stopping_instance_finishes_its_requests(make_service: MakeService) -> None:
    harness, port = web(make_service, 2)
    with harness as h:
        h.wait_ready(30)
        results: list[tuple[int, bytes]] = []
        slow = [threading.Thread(target=lambda: results.append(get(port, "/slow?s=1.5")))
                for _ in range(2)]
        for thread in slow:
            thread.start()
        wait_until(lambda: all(h.instance(f"web/{i}")["endpoints"]["http"]["active"] == 1
                               for i in (0, 1)), 10, "a slow request on each instance")
        h.restart("web/0", "web/1")  # drain: both slow requests finish first
        for thread in slow:
            thread.join(10)
        assert results == [(200, b"web_IN_0"), (200, b"web_IN_1")] or sorted(results) == [
            (200, b"web_IN_0"), (200, b"web_IN_1")]
        drained = [e for e in h.events() if e["event"] == "rotation" and not e["in_rotation"]]
        assert {e["instance"] for e in drained} >= {"web_IN_0", "web_IN_1"}


def test_a_recycle_the_role_asks_for_drains_as_one_the_controller_begins(
        make_service: MakeService) -> None:
    """request_recycle() takes the instance out of rotation and lets its requests in
    flight finish before `stopping` and on_stop, as `rolehost recycle` does. Before, the
    host stopped at once, and a request in flight got a 502."""
    harness, port = web(make_service, 1)
    with harness as h:
        first = h.wait_ready(30)["instances"][0]["pid"]
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(get, port, "/slow?s=2")
            wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["active"] == 1, 10,
                       "the slow request in flight")
            assert get(port, "/recycle") == (200, b"recycling")
            assert slow.result(timeout=30) == (200, b"web_IN_0")
        stopping = h.wait_event(lambda e: e["event"] == "state" and e["state"] == "stopping", 10)
        assert stopping["reason"] == "request_recycle() called"
        wait_until(lambda: h.instance("web/0")["state"] == "ready"
                   and h.instance("web/0")["pid"] != first, 30, "web/0 ready again")
        assert h.instance("web/0")["last_error"] is None


def test_a_draining_instance_says_why_throughout(make_service: MakeService) -> None:
    """The rotation event and `why_out` give the drain's reason, and a probe result in the
    middle of the drain does not wear it down to a bare "draining"."""
    harness, port = web(make_service, 1, endpoint='probe = { path = "/healthz", '
                        'interval = "100ms" }')
    with harness as h:
        h.wait_ready(30)
        def endpoint() -> dict[str, Any]:
            found: dict[str, Any] = h.instance("web/0")["endpoints"]["http"]
            return found

        wait_until(lambda: endpoint()["in_rotation"], 10, "rotation")
        slow = threading.Thread(target=get, args=(port, "/slow?s=2"))
        slow.start()
        wait_until(lambda: endpoint()["active"] == 1, 10, "a request in flight")
        h.restart("web/0", wait=False)
        why = "draining: restart: requested through the control API"
        out = h.wait_event(lambda e: e["event"] == "rotation" and not e["in_rotation"], 10)
        assert out["reason"] == why
        seen = set()

        def drained() -> bool:
            now = endpoint()
            if now["active"]:
                seen.add(now["why_out"])
            return not now["active"]

        wait_until(drained, 15, "the drain")  # probes every 100 ms meanwhile
        slow.join(10)
        assert seen == {why}


def test_connections_to_an_instance_idle_for_idle_timeout_are_closed(
        make_service: MakeService) -> None:
    """A burst leaves as many kept-alive connections as it had requests at once (each a
    thread of a threaded server); those left idle for `idle_timeout` are closed, as idle
    clients are. Before, the pool never shrank."""
    harness, port = web(make_service, 1, endpoint='idle_timeout = "1s"')
    with harness as h:
        controller = psutil.Process(h.wait_ready(30)["pid"])
        private = h.instance("web/0")["endpoints"]["http"]["port"]

        def pooled() -> int:
            return sum(1 for c in controller.net_connections("tcp") if c.raddr
                       and c.raddr.port == private and c.status == psutil.CONN_ESTABLISHED)

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda _: get(port, "/slow?s=0.5")[0], range(8))) == {200}
        assert pooled() >= 4
        wait_until(lambda: pooled() == 0, 10, "the idle connections to be closed")
        assert get(port) == (200, b"web_IN_0")  # a new one, when needed again


def test_large_and_chunked_bodies_stream_both_ways(make_service: MakeService) -> None:
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        size = 12 * 1024 * 1024
        status, body = get(port, f"/big?n={size}")
        assert status == 200 and len(body) == size and body == b"x" * size

        blob = bytes(range(256)) * (size // 256)

        def chunks() -> Iterator[bytes]:
            for offset in range(0, len(blob), 100_000):
                yield blob[offset:offset + 100_000]

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/upload", body=chunks(), encode_chunked=True,
                           headers={"X-Forwarded-For": "10.1.2.3"})
        received, digest, forwarded = connection.getresponse().read().decode().split(" ", 2)
        assert int(received) == size and digest == hashlib.sha256(blob).hexdigest()
        assert forwarded == "10.1.2.3, 127.0.0.1"
        connection.request("POST", "/upload", body=blob)  # Content-Length, same connection
        assert connection.getresponse().read().split()[0] == str(size).encode()
        connection.close()


@pytest.mark.slow
def test_zero_failed_requests_through_restarts_and_kills(make_service: MakeService) -> None:
    harness, port = web(make_service, 3, service={"backoff_initial": "100ms"})
    with harness as h:
        h.wait_ready(30)
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=6) as load:
            load.wait_requests(200)
            for index in range(3):
                h.restart(f"web/{index}")
            for index in range(3):
                h.wait_replaced(f"web/{index}", h.kill(f"web/{index}"), 30)
                h.wait_ready(30)
            load.wait_requests(load.requests + 200)
        report = load.report()
        assert load.failures == [], report
        assert report["requests"] > 600
        print(json.dumps(report))


def test_upgrade_becomes_a_tunnel(make_service: MakeService) -> None:
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as ws:
            ws.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
                       b"Connection: Upgrade\r\n\r\nfirst words")
            received = b""
            while b"FIRST WORDS" not in received:
                received += ws.recv(4096)
            assert received.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert b"Upgrade: echo" in received
            ws.sendall(b"and more")
            echoed = b""
            while len(echoed) < 8:
                echoed += ws.recv(4096)
            assert echoed == b"AND MORE"
            tunnels = h.instance("web/0")["endpoints"]["http"]["active"]
            assert tunnels == 1  # an open tunnel is in flight: a drain would wait for it


TCP_ECHO = """
import socketserver, threading

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        me = RoleEnvironment.current_instance.id.encode()
        while data := self.request.recv(65536):
            self.request.sendall(me + b":" + data)

class Role(RoleEntryPoint):
    def on_start(self):
        endpoint = RoleEnvironment.current_instance.endpoints["echo"]
        self.server = socketserver.ThreadingTCPServer((endpoint.host, endpoint.port), Echo)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return True

    def on_stop(self):
        self.server.shutdown()
"""


def test_tcp_endpoint_balances_connections(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(TCP_ECHO, instances=2, extra=f"""
        [roles.web.endpoints.echo]
        port = {port}
        protocol = "tcp"
        """)
    with service.harness() as h:
        h.wait_ready(30)
        seen = set()
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"ping")
                instance, _, data = conn.recv(4096).partition(b":")
                assert data == b"ping"
                seen.add(instance)
        assert seen == {b"web_IN_0", b"web_IN_1"}


TCP_RAW = """
import socket, socketserver, struct, threading

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        probe("connection")
        try:
            while data := self.request.recv(65536):
                if data == b"reset me":
                    self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                    self.request.close()  # with SO_LINGER 0: a reset
                    return
                self.request.sendall(b"got " + data)
            probe("eof")
        except ConnectionResetError:
            probe("reset")

class Role(RoleEntryPoint):
    def on_start(self):
        endpoint = RoleEnvironment.current_instance.endpoints["raw"]
        while os.path.exists(RoleEnvironment.get_setting("probe") + ".hold"):
            time.sleep(0.05)  # starting, out of rotation, until the test lets it go on
        self.server = socketserver.ThreadingTCPServer((endpoint.host, endpoint.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return True

    def on_stop(self):
        self.server.shutdown()
"""


def test_tcp_an_abort_is_passed_on_as_an_abort(make_service: MakeService) -> None:
    """A reset on one side is a reset on the other, not a clean end: an upload cut short
    must not reach the instance as a whole one."""
    port = free_port()
    service = make_service(TCP_RAW, extra=f"""
        [roles.web.endpoints.raw]
        port = {port}
        protocol = "tcp"
        """)
    linger_0 = struct.pack("ii", 1, 0)
    with service.harness() as h:
        h.wait_ready(30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"part of an upload")
            assert client.recv(4096) == b"got part of an upload"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_0)
        service.wait_probe("reset web_IN_0", 10)
        assert service.count("eof") == 0

        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"reset me")
            with pytest.raises(ConnectionResetError):
                while client.recv(4096):
                    pass

        # A clean end is still one, both ways.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"all of it")
            assert client.recv(4096) == b"got all of it"
            client.shutdown(socket.SHUT_WR)
            assert client.recv(4096) == b""
        service.wait_probe("eof web_IN_0", 10)


def balancer_errors(h: ServiceHarness, endpoint: str) -> dict[str, float]:
    """rolehost_balancer_errors_total of one endpoint, by kind."""
    found = {}
    for family in text_string_to_metric_families(h.client.request_raw("GET", "/v1/metrics")):
        for sample in family.samples:
            if (sample.name == "rolehost_balancer_errors_total"
                    and sample.labels["endpoint"] == endpoint):
                found[sample.labels["kind"]] = sample.value
    return found


def test_tcp_clients_gone_from_the_queue_and_failures_are_seen(
        make_service: MakeService) -> None:
    """A client that leaves while it waits for an instance leaves the queue (and is not
    relayed as an empty connection later); a connection that no instance takes is logged
    and counted as an HTTP request would be."""
    port, quick = free_port(), free_port()
    service = make_service(TCP_RAW, extra=f"""
        [roles.web.endpoints.raw]
        port = {port}
        protocol = "tcp"
        queue_timeout = "60s"
        [roles.web.endpoints.quick]  # nothing listens on the instance's side
        port = {quick}
        protocol = "tcp"
        queue_timeout = "300ms"
        """)
    hold = service.probe.with_name("probe.txt.hold")
    hold.touch()
    with service.harness() as h:
        h.wait_state("web/0", "starting", 30)
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # closed at once
        gone = socket.create_connection(("127.0.0.1", port), timeout=10)
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()  # reset
        with socket.create_connection(("127.0.0.1", port), timeout=10) as waiting:
            waiting.sendall(b"hello")
            def queued() -> int:
                [raw] = [b for b in h.status()["balancers"] if b["endpoint"] == "raw"]
                return int(raw["connections"])

            wait_until(lambda: queued() == 1, 10, "the clients that left to leave the queue",
                       lambda: str(h.status()["balancers"]))
            # Nothing takes it within its queue_timeout: closed, and counted.
            with socket.create_connection(("127.0.0.1", quick), timeout=10) as refused:
                assert refused.recv(100) == b""
            assert balancer_errors(h, "web.quick") == {"503": 1}
            hold.unlink()
            assert waiting.recv(4096) == b"got hello"  # what it sent while it waited
        assert service.count("connection") == 1
        h.wait_ready(30)
        # The instance refuses it: a retry (with no other instance to try), then closed.
        with socket.create_connection(("127.0.0.1", quick), timeout=10) as refused:
            assert refused.recv(100) == b""
        failed = h.wait_event(lambda e: e["event"] == "backend_failed", 10)
        assert (failed["instance"], failed["detail"]) == ("web_IN_0", "no other instance to try")
        assert [e["instance"] for e in h.events() if e["event"] == "retry"] == ["web_IN_0"]
        assert balancer_errors(h, "web.quick") == {"503": 1, "retry": 1, "502": 1}


NOWHERE = """
class Role(RoleEntryPoint):
    def on_start(self):  # ready after its warm-up, listening nowhere: its port refuses
        delays = RoleEnvironment.get_setting("warmup").split(",")
        time.sleep(float(delays[RoleEnvironment.current_instance.index]))
        return True
"""


def test_queue_timeout_bounds_a_request_across_its_attempts(make_service: MakeService) -> None:
    """A request queued for an instance, tried on the first to join (it refuses), then
    tried again: its wait ends queue_timeout after it began, not a queue_timeout after
    each attempt. Under HTTP, and a TCP connection alike."""
    http_port, tcp_port = free_port(), free_port()
    service = make_service(NOWHERE, instances=2, settings={"warmup": "2,600"},
                           role={"stop_timeout": "2s"}, extra=f"""
        [roles.web.endpoints.http]
        port = {http_port}
        queue_timeout = "3s"
        [roles.web.endpoints.raw]
        port = {tcp_port}
        protocol = "tcp"
        queue_timeout = "3s"
        """)
    with service.harness() as h:
        h.wait_state("web/0", "starting", 30)
        h.wait_state("web/1", "starting", 30)

        def waited_http() -> tuple[float, int]:
            began = time.monotonic()
            status = get(http_port)[0]
            return time.monotonic() - began, status

        def waited_tcp() -> tuple[float, bytes]:
            began = time.monotonic()
            with socket.create_connection(("127.0.0.1", tcp_port), timeout=30) as conn:
                conn.sendall(b"hello")
                data = conn.recv(100)
            return time.monotonic() - began, data

        with ThreadPoolExecutor(2) as pool:
            over_http, over_tcp = pool.submit(waited_http), pool.submit(waited_tcp)
            (http_waited, status), (tcp_waited, data) = over_http.result(), over_tcp.result()
        # web_IN_0 joined (about 2 s in) and refused each: the attempts that followed
        # waited for web_IN_1 until the first wait's deadline, 3 s in, and no longer.
        for endpoint in ("web.http", "web.raw"):
            assert balancer_errors(h, endpoint) == {"retry": 1, "502": 1}, endpoint
        assert status == 502 and data == b""
        assert 2.8 < http_waited < 4.0, http_waited
        assert 2.8 < tcp_waited < 4.0, tcp_waited


def test_slow_start_gives_a_joining_instance_a_growing_share(make_service: MakeService) -> None:
    # web_IN_0 is at full weight (2 s) well before web_IN_1 joins (4 s).
    harness, port = web(make_service, 2, warmup="0,4", endpoint='slow_start = "2s"')
    with harness as h:
        h.wait_ready(30)
        early = [get(port)[1] for _ in range(60)]
        share = early.count(b"web_IN_1") / len(early)
        # An even split would be 0.5. (The exact ramp is test_slow_start_weights; on a
        # loaded machine these 60 requests can take a good part of the 2 s ramp.)
        assert share < 0.42, share
        time.sleep(2)  # the ramp is time itself: this is what is under test
        late = [get(port)[1] for _ in range(200)]
        assert 0.35 < late.count(b"web_IN_1") / len(late) < 0.65


def test_slow_start_holds_under_least_outstanding(make_service: MakeService) -> None:
    """A joining instance has the fewest requests in flight: least-outstanding alone would
    give it nearly every request from its first second."""
    # web_IN_0 is at full weight (4 s) well before web_IN_1 joins (8 s).
    harness, port = web(make_service, 2, warmup="0,8", endpoint='slow_start = "4s"\n'
                        'balance = "least-outstanding"')
    with harness as h:
        h.wait_state("web/0", "ready", 30)
        slow = [threading.Thread(target=get, args=(port, "/slow?s=15")) for _ in range(2)]
        for thread in slow:
            thread.start()
        def active(index: int) -> int:
            return int(h.instance(f"web/{index}")["endpoints"]["http"]["active"])

        wait_until(lambda: active(0) == 2, 10, "two requests in flight on web_IN_0")
        wait_until(lambda: h.instance("web/1")["endpoints"]["http"]["in_rotation"], 30,
                   "web_IN_1 to join")
        picks = [get(port)[1] for _ in range(40)]
        assert active(0) == 2  # still: web_IN_1 had the fewest in flight throughout
        share = picks.count(b"web_IN_1") / len(picks)
        assert share < 0.3, share  # a weight of 0.05 to 0.3 in the ramp's first second
        for thread in slow:
            thread.join(30)


def test_a_request_whose_instance_dies_is_retried_on_another(make_service: MakeService) -> None:
    harness, port = web(make_service, 2, service={"backoff_initial": "100ms"})
    with harness as h:
        h.wait_ready(30)
        answers = []
        while h.instance("web/0")["restarts"] == 0 and len(answers) < 20:
            answers.append(get(port, "/die"))  # round-robin: every other one hits web_IN_0
        # web_IN_0 died on its first /die and comes back after its back-off, not at once.
        wait_until(lambda: h.instance("web/0")["restarts"] >= 1, 10, "web/0 to restart")
        assert set(answers) == {(200, b"web_IN_1")}
        retried = [e for e in h.events() if e["event"] == "retry"]
        assert retried and retried[0]["instance"] == "web_IN_0"


def test_backend_connections_are_kept_alive(make_service: MakeService) -> None:
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(50):
            connection.request("GET", "/")
            connection.getresponse().read()
        connection.request("GET", "/connections")
        opened = int(connection.getresponse().read())
        connection.close()
        assert opened <= 2, f"{opened} backend connections for 51 requests"


def test_heads_are_rewritten_hop_by_hop_and_passed_on_otherwise(
        make_service: MakeService) -> None:
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/headers", headers={
                "X-Forwarded-For": "10.0.0.1", "Keep-Alive": "timeout=5", "TE": "trailers",
                "Connection": "keep-alive, TE", "X-Custom": "a", "x-lower": "b"})
            response = connection.getresponse()
            seen = dict(line.split(": ", 1) for line in response.read().decode().splitlines())
            assert seen["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
            assert seen["X-Forwarded-Proto"] == "http"
            assert seen["X-Custom"] == "a" and seen["x-lower"] == "b"
            assert seen["Connection"] == "keep-alive"
            assert "Keep-Alive" not in seen and "TE" not in seen

            # A HEAD's Content-Length says what a GET would get; no body follows it.
            connection.request("HEAD", "/")
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Content-Length") == "1234"
            assert response.read() == b""

            # Reasons pass on as the instance gave them, the same status with another too.
            for reason in ("Fine", "Quite Fine", "OK"):
                connection.request("GET", "/reason?r=" + reason.replace(" ", "+"))
                response = connection.getresponse()
                response.read()
                assert (response.status, response.reason) == (200, reason)
            connection.request("GET", "/")
            assert connection.getresponse().read() == b"web_IN_0"  # the framing held
        finally:
            connection.close()


def exchange(port: int, data: bytes) -> tuple[bytes, bytes]:
    """Send `data` on a new connection; the first head that comes back, and all that
    follows it until the balancer closes the connection."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(data)
        while chunk := raw.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


def test_trailers_named_fields_and_codings_stay_what_they_are(make_service: MakeService) -> None:
    """A trailer never joins the head (it could smuggle in a second Host, say); fields a
    Connection header names go no further; a coding besides chunked is kept; forwarding
    fields keep their order, and X-Forwarded-Proto is the balancer's own."""
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        head, body = exchange(port, b"POST /headers HTTP/1.1\r\nHost: good\r\n"
                              b"Transfer-Encoding: gzip, chunked\r\n"
                              b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n"
                              b"X-Forwarded-Proto: https\r\n"
                              b"Connection: close, X-Internal\r\nX-Internal: secret\r\n\r\n"
                              b"2\r\nhi\r\n0\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\n"
                              b"\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        seen = [tuple(line.split(": ", 1)) for line in body.decode().splitlines()]
        assert [v for k, v in seen if k == "Host"] == ["good"]
        assert [v for k, v in seen if k == "X-Forwarded-For"] == ["10.0.0.1, 10.0.0.2, 127.0.0.1"]
        assert [v for k, v in seen if k == "X-Forwarded-Proto"] == ["http"]
        assert [v for k, v in seen if k == "Transfer-Encoding"] == ["gzip, chunked"]
        assert "X-Internal" not in dict(seen)

        for coding in ("chunked", "gzip, chunked"):
            head, body = exchange(port, b"GET /trailer?te=%s HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n"
                                  % coding.replace(", ", "%2C+").encode())
            fields = head.decode().split("\r\n")[1:]
            assert f"Transfer-Encoding: {coding}" in fields
            assert not any(f.startswith(("X-Sum", "X-Internal")) for f in fields), fields
            assert body == b"2\r\nhi\r\n0\r\n\r\n"


def test_an_http10_client_never_gets_a_chunked_body(make_service: MakeService) -> None:
    """RFC 9112 6.1: no Transfer-Encoding to an HTTP/1.0 request. A body the instance sends
    chunked goes as it comes, and the close ends it, keep-alive asked or not."""
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        for extra in (b"", b"Connection: keep-alive\r\n"):
            head, body = exchange(port, b"GET /big?n=100000 HTTP/1.0\r\n" + extra + b"\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"Transfer-Encoding" not in head and b"Connection: close" in head
            assert body == b"x" * 100000
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            received = b""
            while received.count(b"web_IN_0") < 2:  # a length: kept alive, as asked
                chunk = raw.recv(65536)
                assert chunk, f"closed after {received!r}"
                received += chunk


def test_a_request_needs_one_host(make_service: MakeService) -> None:
    """RFC 9112 3.2: 400 for an HTTP/1.1 request with no Host or several; HTTP/1.0 may
    go without, but not with a Transfer-Encoding (6.1). What came before on the
    connection is answered first."""
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        for request, status in ((b"GET / HTTP/1.1\r\n\r\n", b"400"),
                                (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),
                                (b"GET / HTTP/1.0\r\n\r\n", b"200"),
                                (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"2\r\nhi\r\n0\r\n\r\n", b"400")):
            # both answers, then the close
            head, rest = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + request)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert rest.startswith(b"web_IN_0HTTP/1.1 " + status + b" "), rest
            if status == b"400":  # and the close that follows is announced
                assert b"\r\nConnection: close\r\n" in rest


def test_an_absolute_target_is_passed_on_in_origin_form_with_its_host(
        make_service: MakeService) -> None:
    """RFC 9112 3.2.2: with an absolute-form target, the Host field is ignored; the
    instance gets the target's path, and its authority as the only Host."""
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        for target, host, expected in (
                (b"http://good.example:8080/headers?a=1", b"evil", "good.example:8080"),
                (b"HTTPS://[::1]/headers", b"evil", "[::1]"),
                (b"http://good.example", b"good.example", "good.example")):
            head, body = exchange(port, b"GET %s HTTP/1.1\r\nHost: %s\r\n"
                                  b"Connection: close\r\n\r\n" % (target, host))
            assert head.startswith(b"HTTP/1.1 200 "), head
            seen = [tuple(line.split(": ", 1)) for line in body.decode().splitlines()]
            if target.endswith(b"good.example"):  # no path: "/", the instance's id
                assert body == b"web_IN_0"
                continue
            assert [v for k, v in seen if k == "Host"] == [expected]
            assert dict(seen)["Target"] == target.split(expected.encode(), 1)[1].decode()
        for target in (b"http://user:pw@good.example/", b"ftp://good.example/", b"http:///x"):
            head, body = exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
            assert head.startswith(b"HTTP/1.1 400 "), (target, head)


def test_an_endless_response_head_is_a_502(make_service: MakeService) -> None:
    """An instance's head is bounded as a client's is: one that never ends fails the
    request at 64 KiB, on the relay and on an Upgrade's way, not the controller's memory."""
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        status, body = get(port, "/endless-head")
        assert (status, body) == (502, b"the instance failed before it answered")
        assert h.wait_event(lambda e: e["event"] == "backend_failed", 10)["reason"] == \
            "response head too large"
        head, body = exchange(port, b"GET /endless-head HTTP/1.1\r\nHost: x\r\n"
                              b"Upgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 ") and body == \
            b"the instance's response head is too large"
        assert get(port)[1] == b"web_IN_0"


def test_a_reset_in_an_upgrade_tunnel_is_passed_on_as_a_reset(make_service: MakeService) -> None:
    """As in TCP mode: a tunnel cut by a reset on one side is cut by a reset on the other,
    not ended as if all had been said."""
    harness, port = web(make_service, 1)
    upgrade = b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
    with harness as h:
        h.wait_ready(30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(upgrade % b"/ws-reset")
            with pytest.raises(ConnectionResetError):
                while raw.recv(65536):
                    pass
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(upgrade % b"/ws-end")
        assert raw.recv(65536).startswith(b"HTTP/1.1 101 ")
        raw.sendall(b"half an upload")
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        wait_until(lambda: get(port, "/tunnel-end")[1] == b"reset", 10,
                   "the instance to see the reset", lambda: str(get(port, "/tunnel-end")))


def test_an_upgrade_with_a_body_or_refused_is_relayed_whole(make_service: MakeService) -> None:
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        # The instance answers 200: no tunnel, and the close ends the answer.
        head, body = exchange(port, b"POST /digest HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
                              b"Connection: Upgrade\r\nContent-Length: 5\r\n\r\nhello")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
        assert body.split()[:2] == [b"5", hashlib.sha256(b"hello").hexdigest().encode()]


def test_a_bad_answer_from_the_only_instance_is_a_502_at_once(make_service: MakeService) -> None:
    """A retry has nowhere to go: the answer is the failure, not a wait for another
    instance ending in a 503."""
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        status, body = get(port, "/two-lengths")
        assert (status, body) == (502, b"the instance failed before it answered")
        assert h.wait_event(lambda e: e["event"] == "backend_failed", 10)["attempt"] == 1


def test_a_client_cannot_hold_memory_or_a_connection_by_not_sending(
        make_service: MakeService) -> None:
    harness, port = web(make_service, 1, endpoint='idle_timeout = "1s"')
    with harness as h:
        h.wait_ready(30)
        # The head never ends: 431 past 64 KiB, then the close.
        head, _ = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024))
        assert head.startswith(b"HTTP/1.1 431 ")

        with socket.create_connection(("127.0.0.1", port), timeout=10) as partial:
            partial.sendall(b"GET / HTTP/1.1\r\nHo")
            # Answered, then closed once idle; meanwhile the other is closed mid-head.
            head, body = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"web_IN_0"
            assert partial.recv(100) == b""  # nothing answered
        # A client that reads nothing of a large answer: it holds an instance's
        # connection (and a thread of this one) until it is closed.
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.settimeout(10)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(b"GET /big?n=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["active"] == 1, 10,
                       "the answer to start")
            wait_until(lambda: h.instance("web/0")["endpoints"]["http"]["active"] == 0, 15,
                       "the stalled client to be let go")
            with contextlib.suppress(ConnectionResetError):
                while stalled.recv(1 << 20):
                    pass
        # A request an instance takes longer than that to answer is the instance's time;
        # so is a body it reads late (the balancer stops reading the client meanwhile).
        assert get(port, "/slow?s=2.5") == (200, b"web_IN_0")
        payload = b"x" * (32 * 1024 * 1024)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/late", body=payload)
            response = connection.getresponse()
            assert response.status == 200
            assert response.read().split()[:2] == [
                str(len(payload)).encode(), hashlib.sha256(payload).hexdigest().encode()]
        finally:
            connection.close()


def test_a_private_port_taken_while_its_instance_is_down_is_exchanged(
        make_service: MakeService) -> None:
    """Another program (or controller) that listens on an instance's private port while
    the instance is down would make it crash at every boot: the boot moves it instead."""
    harness, port = web(make_service, 1, service={"stable_after": "1h",
                                                  "backoff_initial": "2s"})
    with harness as h:
        h.wait_ready(30)
        private = h.instance("web/0")["endpoints"]["http"]["port"]
        host = psutil.Process(h.kill("web/0"))
        psutil.wait_procs([host], timeout=10)
        with socket.socket() as squatter:  # during the 2 s back-off
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", private))
            squatter.listen()
            moved = h.wait_event(lambda e: e["event"] == "port_moved", 30)
            assert (moved["old"], moved["endpoint"]) == (private, "http")
            h.wait_ready(30)
            row = h.instance("web/0")
            assert row["endpoints"]["http"]["port"] == moved["new"] != private
            assert row["restarts"] == 1
            assert get(port, "/") == (200, b"web_IN_0")


def test_a_response_cut_mid_body_is_never_followed_by_another(make_service: MakeService) -> None:
    harness, port = web(make_service, 2, service={"backoff_initial": "100ms"})
    with harness as h:
        h.wait_ready(30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while chunk := raw.recv(65536):
                received += chunk
        assert received.count(b"HTTP/1.1 ") == 1  # one (cut) response, then the close
        assert len(received.partition(b"\r\n\r\n")[2]) == 5000
        assert h.wait_event(lambda e: e["event"] == "response_cut", 10)


def test_a_client_that_leaves_is_not_the_instances_fault(make_service: MakeService) -> None:
    harness, port = web(make_service, 1)
    with harness as h:
        h.wait_ready(30)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert get(port, "/slow?s=0.5") == (200, b"web_IN_0")  # the others are done by now
        blamed = [e for e in h.events() if e["event"] in ("retry", "backend_failed")]
        assert blamed == []


def test_slow_start_weights() -> None:
    """The ramp itself, on the balancer alone: a joining backend's weight grows linearly,
    and its share is its weight over the sum of the weights."""
    import asyncio
    import random

    from rolehost.balancer import Balancer
    from rolehost.definition import Balance, Endpoint

    async def shares(age: float, balance: str = "round-robin", busy: int = 0) -> float:
        endpoint = Endpoint(port=1, slow_start=10.0, balance=Balance(balance))
        balancer = Balancer("web", "http", endpoint)
        old, new = balancer.add("old", 1), balancer.add("new", 2)
        for backend in (old, new):
            balancer.set_rotation(backend.instance_id, True, "")
        now = asyncio.get_running_loop().time()
        old.joined, new.joined = now - 100, now - age
        old.active = busy  # requests in flight on the old one
        picks = [(await balancer.pick()).instance_id for _ in range(4000)]  # type: ignore[union-attr]
        return picks.count("new") / len(picks)

    random.seed(7)
    early, middle, late = (asyncio.run(shares(age)) for age in (0.0, 5.0, 20.0))
    assert 0.02 < early < 0.08  # the 5% floor: 0.05 / 1.05
    assert 0.29 < middle < 0.38  # weight 0.5: 0.5 / 1.5
    assert 0.46 < late < 0.54  # full weight

    # least-outstanding: the new one has the fewest in flight, and the ramp still holds.
    early, middle, late = (asyncio.run(shares(age, "least-outstanding", busy=3))
                           for age in (0.0, 5.0, 20.0))
    assert 0.02 < early < 0.08
    assert 0.29 < middle < 0.38
    assert late == 1.0  # at full weight, the fewest in flight wins


def test_a_drain_with_nothing_in_flight_ends_at_once() -> None:
    """drain_timeout = "0s" is a drain that waits for nothing, not one that always runs
    out (and says so in a warning)."""
    import asyncio

    from structlog.testing import capture_logs

    from rolehost.balancer import Balancer
    from rolehost.definition import Endpoint

    async def drain() -> bool:
        balancer = Balancer("web", "http", Endpoint(port=1, drain_timeout=0.0))
        balancer.add("web_IN_0", 2)
        balancer.set_rotation("web_IN_0", True, "")
        return await balancer.drain("web_IN_0", "restart")

    with capture_logs() as logged:
        assert asyncio.run(drain())
    assert [e["event"] for e in logged] == ["rotation", "rotation"]


@pytest.mark.parametrize("balance", ["round-robin", "least-outstanding"])
def test_requests_waiting_for_instances_that_join_together_spread_over_them(
        balance: str) -> None:
    """Requests queued with no instance in rotation spread over the instances that join
    in the same turn of the loop. One that joins alone takes every request waiting then:
    a waiting request goes to the first instance that can take it, never held back in
    the hope that another joins soon (docs/balancer.md, Queueing)."""
    import asyncio
    from collections import Counter

    from rolehost.balancer import Balancer
    from rolehost.definition import Balance, Endpoint

    async def waiting(balancer: Balancer) -> str:
        backend = await balancer.pick()
        assert backend is not None
        backend.begin()  # as _forward does, in the same step as the pick
        return backend.instance_id

    async def spread(together: bool) -> Counter[str]:
        endpoint = Endpoint(port=1, queue_timeout=10.0, balance=Balance(balance))
        balancer = Balancer("web", "http", endpoint)
        ids = [balancer.add(f"web_IN_{i}", 2 + i).instance_id for i in range(3)]
        tasks = [asyncio.ensure_future(waiting(balancer)) for _ in range(9)]
        for _ in range(5):  # turns of the loop, not time: each one reaches its wait
            await asyncio.sleep(0)
        assert not any(task.done() for task in tasks)
        first, *others = ids
        balancer.set_rotation(first, True, "")
        if not together:  # the others join once the waiting are answered: any time later
            picked = Counter(await asyncio.wait_for(asyncio.gather(*tasks), 5))
        for instance_id in others:
            balancer.set_rotation(instance_id, True, "")
        if together:
            picked = Counter(await asyncio.wait_for(asyncio.gather(*tasks), 5))
        return picked

    assert asyncio.run(spread(together=True)) == {"web_IN_0": 3, "web_IN_1": 3, "web_IN_2": 3}
    assert asyncio.run(spread(together=False)) == {"web_IN_0": 9}
