"""Fault 29: an instance grows past its role's `max_memory`."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from rolehost.testing import wait_until
from support.cli import rolehost
from support.faults import FAST, Bystander, role, state_events
from support.service import MakeService

# The faulty instance's first boot starts a child that holds 150 MB: the tree is what
# counts, not the host alone. Its next boot does not.
GROWING = """
class Role(RoleEntryPoint):
    def on_start(self):
        if faulty() and once("grow"):
            self.child = subprocess.Popen([sys.executable, "-c",
                                           "import time; x = 'x' * 150_000_000; time.sleep(600)"])
            probe("grew")
        return True

    def on_stop(self):
        probe("on_stop")
"""


def test_an_instance_over_max_memory_is_recycled(make_service: MakeService) -> None:
    service = make_service(role(GROWING), instances=2, service=FAST,
                           role={"max_memory": "100MB", "stop_timeout": "5s"})
    with service.harness() as h:
        bystander = Bystander(h)
        event = h.wait_event(lambda e: e["event"] == "memory_recycle", 30, "memory_recycle")
        assert event["instance"] == "web_IN_0" and event["max_memory"] == "100MB", event
        assert event["rss_mb"] > 100, event
        # Gracefully, as a recycle the host asked for: on_stop ran, then a new boot.
        row = wait_until(lambda: r if (r := h.instance("web/0"))["back"] and r["restarts"] == 1
                         else None, 30, "web/0 back after its recycle")
        assert service.probes().count("on_stop web_IN_0") == 1
        assert service.count("grew") == 1
        (recycling,) = state_events(h, "web_IN_0", "recycling")
        assert recycling["reason"].startswith("max_memory: the host's processes use "), recycling
        assert row["last_error"].startswith("max_memory: the host's processes use "), row
        assert row["last_error"].endswith("MB, over 100MB"), row
        # Memory per instance, in status (JSON and text) and the metrics, once measured.
        rows = wait_until(lambda: s if all((s := h.status()["instances"])[n]["memory_bytes"]
                                           for n in (0, 1)) else None, 15, "memory measured")
        for each in rows:
            assert 5 * 2**20 < each["memory_bytes"] < 100 * 2**20, each
        args = ("-f", str(service.toml), "--run-dir", str(h.run_dir.path))
        as_json = json.loads(rolehost("status", "--json", *args).stdout)
        assert all(i["memory_bytes"] for i in as_json["instances"])
        lines = rolehost("status", *args).stdout.splitlines()
        table = lines[next(n for n, line in enumerate(lines) if line.startswith("INSTANCE")):]
        assert table[0].split()[:5] == ["INSTANCE", "UD", "STATE", "PID", "MEMORY"], lines
        assert [line.split()[4][-2:] for line in table[1:]] == ["MB", "MB"], lines
        metrics = {(s.name, s.labels.get("instance")): s.value
                   for f in text_string_to_metric_families(
                       h.client.request_raw("GET", "/v1/metrics"))
                   for s in f.samples}
        assert metrics["rolehost_instance_memory_bytes", "web_IN_1"] > 5 * 2**20
        assert metrics["rolehost_memory_recycles_total", None] == 1
        bystander.check()
