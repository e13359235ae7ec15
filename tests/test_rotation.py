"""Rotation is the truth: every operation that takes instances out waits until each is
back, ready *and* in rotation on its input endpoints, before it takes the next ones.

A site that is cold for a while after on_start is the case that breaks a walk counting
an instance back at state `ready`: its health probe keeps it out of rotation until it is
warm, and a walk that moved on at `ready` would take the second update domain down while
the first still warms. These tests run that site under load through every rolling
operation and read the balancer's own rotation events.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.net import free_port, get
from support.roles import HTTP_SITE
from support.service import MakeService, Service

pytestmark = pytest.mark.slow

# Cold for `warmup` seconds after on_start: /healthz and every page answer 503 until
# then, so a request the balancer sent to a cold instance fails. A config change is
# applied by recycling (its `changing` handler cancels), as a site that reads its
# settings once at start would.
WARMING = HTTP_SITE + """
VERSION = "v1"

class Handler(Site):
    warm_at = 0.0

    def do_GET(self):
        if time.monotonic() < Handler.warm_at:
            return self.reply(503, b"warming up")
        self.reply(200, f"{VERSION} {RoleEnvironment.current_instance.id}".encode())

class Role(Serving):
    handler = Handler

    def on_start(self):
        Handler.warm_at = time.monotonic() + float(RoleEnvironment.get_setting("warmup"))
        RoleEnvironment.on_changing(lambda change: change.cancel())
        return super().on_start()
"""


def warming_site(make_service: MakeService, warmup: float = 3.0,
                 **endpoint: str) -> tuple[Service, int]:
    port = free_port()
    keys = "\n".join(f"{k} = {v}" for k, v in {
        "queue_timeout": '"1s"',
        "probe": '{ path = "/healthz", interval = "200ms" }',
        **endpoint}.items())
    service = make_service(
        WARMING, instances=2, service={"upgrade_domains": 2},
        role={"stop_timeout": "10s"}, settings={"warmup": str(warmup), "greeting": "hi"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        {keys}
        """)
    return service, port


def in_rotation_throughout(h: ServiceHarness, since: int) -> None:
    """Replay the balancer's rotation events: from `since` on, at least one instance of
    the role is in rotation at every moment."""
    inside: set[str] = set()
    for event in h.events():
        if event.get("event") != "rotation":
            continue
        (inside.add if event["in_rotation"] else inside.discard)(event["instance"])
        if event["seq"] > since:
            assert inside, f"no instance in rotation after event {event}"
    assert inside


def last_seq(h: ServiceHarness) -> int:
    return max(e["seq"] for e in h.events())


@contextlib.contextmanager
def under_load(port: int) -> Iterator[LoadProbe]:
    """Steady keep-alive load, already flowing; stopped however the block ends."""
    with LoadProbe(f"http://127.0.0.1:{port}/", clients=6) as load:
        load.wait_requests(100)
        yield load


def test_walks_wait_for_a_probe_gated_warm_up(make_service: MakeService) -> None:
    """The issue's case: cold 3 s after on_start, queue_timeout 1 s, a host-os then a
    guest-os walk under keep-alive load. A walk counting an instance back at `ready`
    fails requests with 503 (the queue runs out while both domains are cold)."""
    service, port = warming_site(make_service)
    with service.harness() as h:
        h.wait_ready(60)
        since = last_seq(h)
        with under_load(port) as load:
            for kind in ("host-os", "guest-os"):
                walk = h.upgrade(kind, timeout=120)
                assert walk["state"] == "succeeded", walk
                # Each domain is out for its warm-up at least: the walk waited for it.
                assert walk["seconds"] >= 2 * 3.0, walk
            load.wait_requests(load.requests + 100)
        assert load.failures == [], load.report()
        in_rotation_throughout(h, since)


def test_deploy_and_its_rollback_wait_for_rotation(make_service: MakeService) -> None:
    service, port = warming_site(make_service, warmup=2.0)
    roles = service.toml.parent / "app" / "roles.py"
    with service.harness() as h:
        h.wait_ready(60)
        since = last_seq(h)
        with under_load(port) as load:
            roles.write_text(roles.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
            h.package("v2")
            walk = h.deploy("v2", timeout=120)
            assert walk["state"] == "succeeded", walk
            wait_until(lambda: load.requests > 100, 30, "requests after the deploy")
            # A broken version: UD 0 fails, and its rollback must wait for rotation too.
            roles.write_text(roles.read_text().replace(
                "    def on_start(self):\n",
                "    def on_start(self):\n        raise RuntimeError('v3 is broken')\n"))
            h.package("v3")
            walk = h.deploy("v3", timeout=120)
            assert walk["state"] == "rolled back", walk
            load.wait_requests(load.requests + 100)
        assert load.failures == [], load.report()
        in_rotation_throughout(h, since)
        status, body = get(port)
        assert status == 200 and body.startswith(b"v2 "), body  # rolled back to v2


def test_a_config_change_that_recycles_waits_for_rotation(make_service: MakeService) -> None:
    service, port = warming_site(make_service, warmup=2.0)
    with service.harness() as h:
        h.wait_ready(60)
        since = last_seq(h)
        with under_load(port) as load:
            outcome = h.set_setting("web", "greeting", "hello")
            assert outcome == {"web_IN_0": "recycled", "web_IN_1": "recycled"}, outcome
            load.wait_requests(load.requests + 100)
        assert load.failures == [], load.report()
        in_rotation_throughout(h, since)


def test_wait_and_scale_answer_once_in_rotation(make_service: MakeService) -> None:
    """`restart --wait` and a scale-out answer once the instance is in rotation, and
    `status` says, meanwhile, that it is ready but not yet in rotation, and why."""
    service, _ = warming_site(make_service, warmup=2.0)
    with service.harness() as h:
        h.wait_ready(60)
        old = h.instance("web/0")["pid"]
        h.client.maintain("restart", ["web/0"], wait=False)
        row = wait_until(lambda: (i := h.instance("web/0"))["state"] == "ready"
                         and i["pid"] != old and i, 30, "web/0 ready in a new host")
        assert not row["back"], row
        # Connection refused: probed before on_start bound the port.
        assert re.fullmatch(r"not yet in rotation: http: probe failing \(0/1 healthy\): "
                            r"(HTTP 503|Connection refused)", row["why_not_back"]), row
        wait_until(lambda: h.instance("web/0")["back"], 30, "web/0 back")

        [after] = h.restart("web/1")
        assert after["back"] and after["endpoints"]["http"]["in_rotation"], after
        added = h.scale("web", 3)
        assert added == ["web_IN_2"]
        row = h.instance("web/2")
        assert row["back"] and row["endpoints"]["http"]["in_rotation"], row


def test_a_site_that_never_gets_in_rotation_misses_its_ready_deadline(
        make_service: MakeService) -> None:
    """The ready deadline covers the time until the instance is back: ready but never
    in rotation fails it ("waiting for host"), and the walk halts there."""
    service, _ = warming_site(make_service, warmup=3600)
    text = service.toml.read_text().replace("[service]", '[service]\nready_deadline = "3s"')
    service.toml.write_text(text)
    with service.harness() as h:
        failed = wait_until(lambda: (i := h.instance("web/0"))["state"] == "failed" and i,
                            30, "web/0 to miss its deadline")
        assert "not ready within the ready deadline (3s)" in failed["last_error"], failed
        assert "not yet in rotation: http: probe failing" in failed["last_error"], failed
        status: dict[str, Any] = h.status()
        assert {b["endpoint"]: b["in_rotation"] for b in status["balancers"]} == {"http": []}


def test_the_status_line_tells_ready_from_in_rotation(make_service: MakeService,
                                                      tmp_path: Path) -> None:
    import subprocess
    import sys

    service, _ = warming_site(make_service, warmup=3600)
    with service.harness() as h:
        wait_until(lambda: h.instance("web/0")["state"] == "ready", 30, "web/0 ready")
        shown = subprocess.run(
            [sys.executable, "-m", "rolehost", "status", "-f", str(service.toml),
             "--run-dir", str(h.run_dir.path)],
            capture_output=True, text=True, timeout=30, check=True).stdout
        line = next(line for line in shown.splitlines() if line.startswith("web_IN_0"))
        assert re.search(r"\bready\b.*not yet in rotation: http: probe failing "
                         r"\(0/1 healthy\): (HTTP 503|Connection refused)", line), shown
        metrics = h.client.request_raw("GET", "/v1/metrics")
        assert 'rolehost_instances_back{role="web"} 0.0' in metrics, metrics


def test_systemd_hears_ready_once_an_instance_is_in_rotation(make_service: MakeService,
                                                             tmp_path: Path) -> None:
    """READY=1 tells systemd the service serves: not before the probe lets one in."""
    import socket

    service, _ = warming_site(make_service, warmup=2.0)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(20)
        with service.harness(env={"NOTIFY_SOCKET": str(path)}) as h:
            while b"READY=1" not in (message := systemd.recv(4096)):
                pass
            assert any(i["back"] for i in h.status()["instances"]), message
            # Both were `ready` for about 2 s before that: READY=1 came with the probe.
            back = [i for i in h.status()["instances"] if i["back"]]
            assert all(i["back_since"] > i["ready_since"] for i in back), back
