"""Prometheus metrics: scraped over the control socket and over TCP, then parsed."""

from __future__ import annotations

import http.client
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rolehost.fabric.lifecycle import State
from support.net import free_port, get
from support.roles import WEB
from support.service import MakeService


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_scraped_and_parsed(make_service: MakeService) -> None:
    port, metrics_port = free_port(), free_port()
    service = make_service(
        WEB, instances=2, settings={"warmup": "0,0"},
        service={"metrics": f"127.0.0.1:{metrics_port}", "backoff_initial": "100ms"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        [[roles.web.startup_tasks]]
        command = ["true"]
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        for _ in range(10):
            assert get(port)[0] == 200
        h.restart("web/0")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")  # a keep-alive client, so the drain has one to wait on
        connection.getresponse().read()
        over_tcp = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=10).read().decode()
        over_socket = h.client.request_raw("GET", "/v1/metrics")
        connection.close()
        for text in (over_tcp, over_socket):
            # prometheus-client's `*_created` gauges doubled the series, undocumented
            assert "_created" not in text
            found = samples(text)
            ready = found[("rolehost_instances", (("role", "web"), ("state", "ready")))]
            assert ready == 2
            assert found[("rolehost_instances_back", (("role", "web"),))] == 2
            # web_IN_0 was stopping, then bootstrapping, in the restart: those series say
            # 0 now rather than vanish (a dashboard kept showing their last value).
            by_state = {dict(labels)["state"]: value for (name, labels), value in found.items()
                        if name == "rolehost_instances"}
            assert by_state == {state.value: 2 if state is State.READY else 0
                                for state in State}
            served = sum(v for (name, _), v in found.items()
                         if name == "rolehost_balancer_requests_total")
            assert served >= 10
            assert found[("rolehost_instance_starts_total",
                          (("cause", "restart"), ("role", "web")))] == 1
            assert found[("rolehost_instance_starts_total",
                          (("cause", "start"), ("role", "web")))] == 2
            assert found[("rolehost_time_to_ready_seconds_count", (("role", "web"),))] == 3
            assert found[("rolehost_task_duration_seconds_count",
                          (("role", "web"), ("type", "simple")))] == 3
            assert found[("rolehost_operations_total",
                          (("kind", "restart"), ("outcome", "succeeded")))] == 1
            assert found[("rolehost_in_rotation",
                          (("endpoint", "web.http"), ("instance", "web_IN_1")))] == 1
        # the TCP listener serves the metrics and nothing of the control API
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/v1/status", timeout=10)
            raise AssertionError("the control API must not be reachable over TCP")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404


def test_metrics_are_served_on_an_ipv6_address(make_service: MakeService) -> None:
    """`metrics = "[::1]:PORT"`: the model refused it (while `--health` took it), and the
    listener was handed the host with its brackets."""
    import socket

    import pytest

    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    metrics_port = free_port()  # not the kernel's choice: see support.net
    service = make_service("class Role(RoleEntryPoint): pass",
                           service={"metrics": f"[::1]:{metrics_port}"})
    with service.harness() as h:
        h.wait_ready(30)
        text = urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert samples(text)[("rolehost_instances", (("role", "web"), ("state", "ready")))] == 1
