"""Faults 11 and 12: a health probe that never passes or flaps; status checks that
raise or hang."""

from __future__ import annotations

import http.client
import time
from typing import Any

import psutil

from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.faults import Bystander, endpoint, role
from support.net import free_port
from support.service import MakeService

PROBE = '{ path = "/healthz", interval = "100ms", timeout = "1s", healthy = 1, unhealthy = 2 }'


def get(port: int, path: str = "/") -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def http_status(h: ServiceHarness, name: str) -> dict[str, Any]:
    result: dict[str, Any] = h.instance(name)["endpoints"]["http"]
    return result


def test_probe_never_passes(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(role(
        """
        def healthy():  # instance 0 never; instance 1 until told otherwise
            return not faulty() and not flag("sick")
        """, web=True), instances=2,
        extra=endpoint(port, probe=PROBE, queue_timeout='"500ms"'))
    with service.harness() as h:
        bystander = Bystander(h)
        wait_until(lambda: http_status(h, "web/1")["in_rotation"], 10, "web/1 in rotation")
        # instance 0 is ready, and its probe has been answered, and it is not in rotation.
        # (The first probes may find nothing listening yet: on_start binds the port.)
        wait_until(lambda: http_status(h, "web/0").get("probe", {}).get("seen") == "HTTP 503",
                   10, "a probe of web/0 answered 503")
        row = h.instance("web/0")
        assert row["state"] == "ready" and row["restarts"] == 0
        out = row["endpoints"]["http"]
        assert not out["in_rotation"] and out["why_out"] == "probe failing: HTTP 503"
        assert out["probe"] == {"healthy": False, "seen": "HTTP 503", "passes": 0,
                                "needed": out["probe"]["needed"]}
        # ready, not back: what a walk would wait for, and status says why
        assert not row["back"] and row["why_not_back"].startswith(
            "not yet in rotation: http: probe failing"), row
        assert {get(port)[1] for _ in range(10)} == {b"web_IN_1"}
        # with no instance in rotation at all, a request queues, then gets a 503
        (service.probe.parent / "probe.txt.sick").touch()
        wait_until(lambda: not http_status(h, "web/1")["in_rotation"], 10, "web/1 out")
        began = time.monotonic()
        status, body, headers = get(port)
        waited = time.monotonic() - began
        assert (status, body, headers["Retry-After"]) == (503, b"no instance in rotation", "1")
        assert 0.5 <= waited < 2, f"answered after {waited:.2f}s with queue_timeout 500ms"
        # once the probe passes again, requests are served (queued until then)
        (service.probe.parent / "probe.txt.sick").unlink()
        assert get(port)[:2] == (200, b"web_IN_1")
        assert h.instance("web/0")["pid"] == row["pid"]  # a failing probe never recycles
        bystander.check()


def test_probe_flaps(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(role(
        """
        def healthy():  # 0.4 s healthy, 0.4 s sick, over and over
            return int(time.monotonic() / 0.4) % 2 == 0
        """, web=True), instances=1,
        extra=endpoint(port, probe=PROBE, queue_timeout='"5s"'))
    with service.harness() as h:
        row = h.wait_ready(30)["instances"][0]
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=2) as load:
            def flapped() -> bool:
                changes = [e["in_rotation"] for e in h.events() if e["event"] == "rotation"
                           and e["instance"] == "web_IN_0"]
                return changes.count(False) >= 3 and changes.count(True) >= 3

            wait_until(flapped, 10, "three flaps")
        # out of rotation for a moment each time: requests wait, none fails
        assert load.failures == [], load.report()
        assert load.requests > 0
        after = h.instance("web/0")
        assert (after["state"], after["pid"], after["restarts"]) == ("ready", row["pid"], 0)


CHECKS = """
class Role(RoleEntryPoint):
    def on_start(self):
        RoleEnvironment.on_status_check(self.check)
        return True
    def check(self, status):
        if faulty() and flag("raise"):
            raise LookupError("backlog table missing")
        while faulty() and flag("hang"):
            time.sleep(0.02)
"""


def test_status_check_raises(make_service: MakeService) -> None:
    service = make_service(role(CHECKS), instances=2, role={"status_check_interval": "200ms"})
    with service.harness() as h:
        bystander = Bystander(h)
        pid = h.wait_state("web/0", "ready", 30)["pid"]
        raising = service.probe.parent / "probe.txt.raise"
        raising.touch()
        row = h.wait_state("web/0", "busy", 10)
        assert row["reason"] == "status check raised: LookupError: backlog table missing"
        assert row["last_error"] == "status_check: LookupError: backlog table missing"
        assert "Traceback" in h.logs("web/0")
        raising.unlink()
        row = h.wait_state("web/0", "ready", 10)
        assert row["pid"] == pid and row["restarts"] == 0
        bystander.check()


def test_status_check_hangs(make_service: MakeService) -> None:
    service = make_service(role(CHECKS), instances=2, role={"status_check_interval": "200ms"})
    with service.harness() as h:
        bystander = Bystander(h)
        pid = h.wait_state("web/0", "ready", 30)["pid"]
        hanging = service.probe.parent / "probe.txt.hang"
        hanging.touch()
        row = h.wait_state("web/0", "busy", 10)
        assert row["reason"] == "status check did not answer within 0.2s"
        hanging.unlink()
        row = h.wait_state("web/0", "ready", 10)
        assert row["pid"] == pid and row["restarts"] == 0
        bystander.check()


def test_a_hung_status_check_is_not_asked_again_until_it_answers(
        make_service: MakeService) -> None:
    # One new thread per interval, never ending, would have grown a host without bound.
    service = make_service(role(CHECKS), instances=2, role={"status_check_interval": "100ms"})
    with service.harness() as h:
        bystander = Bystander(h)
        pid = h.wait_state("web/0", "ready", 30)["pid"]
        host = psutil.Process(pid)
        hanging = service.probe.parent / "probe.txt.hang"
        hanging.touch()
        assert h.wait_state("web/0", "busy", 10)["reason"] == (
            "status check did not answer within 0.1s")
        threads = host.num_threads()
        watch_until = time.monotonic() + 2  # twenty intervals
        while time.monotonic() < watch_until:
            assert host.num_threads() <= threads
            assert h.instance("web/0")["state"] == "busy"
            time.sleep(0.05)
        hanging.unlink()
        row = h.wait_state("web/0", "ready", 10)
        assert row["pid"] == pid and row["restarts"] == 0
        bystander.check()
