"""Running out of descriptors (issue 19): a controller started under a low limit, more
idle connections held against its endpoint than the limit, and nothing else goes down."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
import time
from pathlib import Path

import psutil

from rolehost.definition import Definition, parse
from rolehost.fabric import descriptors
from rolehost.testing import wait_until
from support.cli import rolehost
from support.net import free_port, get
from support.roles import WEB
from support.service import MakeService

SOFT, HARD = 256, 512  # systemd's default soft limit is 1024: the same, scaled down
IDLE = 600  # more than HARD, as the 1,100 were more than 1024


def limited_python(folder: Path, soft: int, hard: int) -> Path:
    """An interpreter that runs under RLIMIT_NOFILE (soft, hard): this one, exec'd with
    the limits set, as `ulimit -S -n SOFT; ulimit -H -n HARD` would set them."""
    wrapper = folder / "python-limited"
    wrapper.write_text(f"#!{sys.executable}\n"
                       "import os, resource, sys\n"
                       f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
                       f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    return wrapper


def served(port: int) -> bool:
    try:
        return get(port, "/", timeout=5)[0] == 200
    except OSError:
        return False


def test_idle_connections_past_the_descriptor_limit_take_nothing_down(
        make_service: MakeService, tmp_path: Path) -> None:
    port = free_port()
    service = make_service(WEB, instances=2, settings={"warmup": "0,0,0,0"},
                           role={"stop_timeout": "5s"}, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        probe = {{ path = "/healthz", interval = "200ms", timeout = "1s", unhealthy = 1 }}
        """)
    idle: list[socket.socket] = []
    # The test's own limit must hold the idle connections (CI's soft limit may be 1024).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * IDLE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * IDLE), hard))
    with service.harness(python=limited_python(tmp_path, SOFT, HARD)) as h:
        status = h.wait_ready(30)
        # The soft limit was raised to the hard one; the endpoint's default is its share.
        controller = psutil.Process(status["pid"])
        assert controller.rlimit(psutil.RLIMIT_NOFILE) == (HARD, HARD)
        share = (HARD - descriptors.reserve(2)) // 2
        assert status["balancers"][0]["max_connections"] == share
        events = h.events()
        limit = next(e for e in events if e["event"] == "descriptor_limit")
        assert (limit["was"], limit["soft"], limit["max_connections"]) == (SOFT, HARD, share)
        listening = next(e for e in events if e["event"] == "balancer_listening")
        assert listening["backlog"] == descriptors.somaxconn()

        try:
            for _ in range(IDLE):  # connected or not: the ones past the backlog may wait
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                idle.append(sock)
            h.wait_event(lambda e: e["event"] == "connection_limit", 30, "connection_limit")
            # Several probe intervals at the limit: the control API answers (the CLI's
            # `status` too), probes pass, both instances stay in rotation, and a host
            # restarts (its pipes, its process handle, its probes) as usual.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                balancer = h.status()["balancers"][0]
                assert balancer["in_rotation"] == ["web_IN_0", "web_IN_1"], balancer
                assert balancer["connections"] <= share
                time.sleep(0.2)
            shown = rolehost("status", "-f", str(service.toml), "--run-dir",
                             str(h.run_dir.path))
            assert shown.returncode == 0 and "web_IN_0" in shown.stdout, shown.stderr
            pid = h.instance("web/1")["pid"]
            h.restart("web/1")
            row = h.wait_ready(30)["instances"][1]
            assert row["pid"] != pid and row["endpoints"]["http"]["in_rotation"]
            assert len(os.listdir(f"/proc/{controller.pid}/fd")) < HARD
            # A new client is served while they are held: idle connections (these sent
            # nothing in over a second) are closed to make room for the ones waiting.
            wait_until(lambda: served(port), 30, "a new client served")
            assert h.status()["balancers"][0]["connections"] <= share
            assert any(e["event"] == "connections_reclaimed" for e in h.events())
            metrics = h.client.request_raw("GET", "/v1/metrics")
            assert 'rolehost_limits_reached_total{endpoint="web.http",limit="connections"}' \
                in metrics
            assert f'rolehost_balancer_max_connections{{endpoint="web.http"}} {share}.0' \
                in metrics
        finally:
            for sock in idle:
                sock.close()
        assert served(port)
        assert not [e for e in h.events() if e["event"] in ("probe_error", "api_error")]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_default_share_its_bounds_and_the_unit_limit() -> None:
    # (limit - reserve) / (2 x endpoints), between the floor and the ceiling.
    assert descriptors.reserve(2) == 96
    assert descriptors.default_max_connections(1024, 1, 2) == (1024 - 96) // 2
    assert descriptors.default_max_connections(1024, 2, 2) == (1024 - 96) // 4
    assert descriptors.default_max_connections(100, 3, 10) == descriptors.FLOOR
    assert descriptors.default_max_connections(1 << 20, 1, 2) == descriptors.CEILING

    def service(**endpoint: object) -> Definition:
        return parse({"service": {"name": "s"}, "roles": {"web": {
            "entry_point": "roles:Role", "instances": 2,
            "endpoints": {"http": {"port": 8080, **endpoint}}}}})

    # The unit's LimitNOFILE: 65,536, or what explicit max_connections need, if more.
    assert descriptors.unit_limit(service()) == 65_536
    needed = descriptors.reserve(2) + 2 * 40_000
    assert descriptors.unit_limit(service(max_connections=40_000)) == needed


def test_staging_listeners_are_in_the_budget(make_service: MakeService, tmp_path: Path) -> None:
    """A staging deployment's listeners were left out of the shares: each got production's
    share of the whole limit, so the two slots' connections could need twice what the
    limit allows. An endpoint with a staging_port counts twice, and its instances too."""
    port, staging_port = free_port(), free_port()
    service = make_service(WEB, settings={"warmup": "0,0,0,0"}, role={"stop_timeout": "5s"},
                           extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        staging_port = {staging_port}
        """)
    with service.harness(python=limited_python(tmp_path, SOFT, HARD)) as h:
        production = h.wait_ready(30)
        # Two listeners (production's, staging's), one instance in each slot.
        share = (HARD - descriptors.reserve(2)) // (2 * 2)
        assert production["balancers"][0]["max_connections"] == share
        h.package("v2")
        h.client.deploy("v2", slot="staging")
        staging = h.client.status("staging")
        assert staging["balancers"][0]["max_connections"] == share
        listeners = production["balancers"] + staging["balancers"]
        needed = descriptors.reserve(2) + descriptors.PER_CONNECTION * sum(
            b["max_connections"] for b in listeners)
        assert needed <= HARD, (needed, listeners)
        assert served(port) and served(staging_port)
        assert not any(e["event"] == "descriptor_limit_low" for e in h.events())


def test_the_share_counts_the_staging_slot() -> None:
    def service(**endpoint: object) -> Definition:
        return parse({"service": {"name": "s"}, "roles": {"web": {
            "entry_point": "roles:Role", "instances": 2,
            "endpoints": {"http": {"port": 8080, **endpoint},
                          "admin": {"port": 8081}}}}})

    assert descriptors.listeners(service()) == 2
    assert descriptors.listeners(service(staging_port=9080)) == 3
    # Where a staging deployment can run, its instances are reserved for too.
    assert descriptors.needed(service(staging_port=9080), 100) == (
        descriptors.reserve(4) + 2 * 3 * 100)
    assert descriptors.needed(service(), 100) == descriptors.reserve(2) + 2 * 2 * 100
