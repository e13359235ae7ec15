"""Internal endpoints and discovery: a role finds the instances of another through
`RoleEnvironment.roles`, and follows them as they scale, recycle and move ports."""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from rolehost.fabric import discovery
from rolehost.testing import ServiceHarness, wait_until
from support.cli import rolehost
from support.net import answer_and_body, free_port
from support.roles import HTTP_SITE
from support.service import MakeService

# Workers answer their id on their internal endpoint `rpc`; the web role's GET asks every
# worker it discovers and answers one line per worker: id, ready flag, what it said.
ROLES = HTTP_SITE + """
import socket, socketserver
from rolehost import TopologyChange

class Answer(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(RoleEnvironment.current_instance.id.encode())

class Worker(Serving):  # on a TCP server of its own: Serving's run and on_stop
    def on_start(self):
        # Held while the test's `hold` file (beside the probe) exists, 30 s at most: a
        # reimage takes tens of ms, less than a poll could be sure to see.
        hold = RoleEnvironment.get_setting("probe") + ".hold"
        deadline = time.monotonic() + 30
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.02)
        rpc = RoleEnvironment.current_instance.endpoints["rpc"]
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((rpc.host, rpc.port), Answer)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return True

def ask(endpoint):
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=2) as s:
            return s.recv(100).decode() or "-"
    except OSError:
        return "-"

class Ask(Site):
    def do_GET(self):
        lines = [f"{w.id} {w.ready} {w.endpoints['rpc'].port} {ask(w.endpoints['rpc'])}"
                 for w in RoleEnvironment.roles["worker"].instances]
        self.reply(200, "\\n".join(lines).encode())

class Web(Serving):
    handler = Ask

    def on_start(self):
        RoleEnvironment.on_changed(self.changed)
        return super().on_start()

    def changed(self, changes):
        probe("changed " + ",".join(c.role for c in changes if isinstance(c, TopologyChange)))
"""

WORKER = """
[roles.web.endpoints.http]
port = {port}
[roles.web.internal_endpoints.ping]

[roles.worker]
entry_point = "roles:Worker"
app = "app"
instances = 2
stop_timeout = "5s"
[roles.worker.settings]
probe = "{probe}"
[roles.worker.internal_endpoints.rpc]
"""


def _workers(port: int) -> dict[str, tuple[bool, int, str]]:
    """What the web role answers: each worker it discovers, whether it is ready, its
    rpc port and what it answered there ("-": nothing)."""
    status, body = answer_and_body(port, "/")
    assert status == 200, body
    found = {}
    for line in body.splitlines():
        worker, ready, rpc, said = line.split()
        found[worker] = (ready == "True", int(rpc), said)
    return found


def _all_answer(port: int, ids: list[str]) -> dict[str, tuple[bool, int, str]] | None:
    found = _workers(port)
    ok = sorted(found) == ids and all(r and said == w for w, (r, _, said) in found.items())
    return found if ok else None


def test_a_role_discovers_the_workers_as_they_scale_reimage_move_and_go(
        make_service: MakeService, tmp_path: Path) -> None:
    port = free_port()
    probe = tmp_path / "probe.txt"
    service = make_service(
        ROLES, entry_point="roles:Web", role={"stop_timeout": "5s"},
        service={"backoff_initial": 1, "ready_deadline": "60s"},
        extra=WORKER.format(port=port, probe=probe))
    with service.harness(run_dir=tmp_path / "run") as h:
        h.wait_ready(30)
        two = ["worker_IN_0", "worker_IN_1"]
        wait_until(lambda: _all_answer(port, two), 15, "both workers to answer",
                   lambda: str(_workers(port)))
        # Internal endpoints show in status, where each instance listens.
        worker = h.instance("worker_IN_0")
        rpc = worker["endpoints"]["rpc"]
        assert (rpc["kind"], rpc["protocol"], rpc["host"]) == ("internal", "tcp", "127.0.0.1")
        assert h.instance("web_IN_0")["endpoints"]["ping"]["kind"] == "internal"
        shown = rolehost("status", "-f", str(service.toml), "--run-dir", str(h.run_dir.path))
        assert f"worker_IN_0.rpc  internal  tcp   127.0.0.1:{rpc['port']}" in shown.stdout

        # A scale-out, as a user runs it: the web role's next GET asks the third too.
        scaled = rolehost("scale", "worker", "3", "-f", str(service.toml),
                          "--run-dir", str(h.run_dir.path))
        assert scaled.returncode == 0, scaled.stderr
        three = [*two, "worker_IN_2"]
        wait_until(lambda: _all_answer(port, three), 15, "three workers to answer",
                   lambda: str(_workers(port)))

        # A reimage: the worker is listed throughout, not ready while it is down (its
        # start held until the web role has been seen to say so), and answers again
        # once it is back.
        hold = Path(f"{probe}.hold")
        hold.touch()
        h.reimage("worker_IN_1", wait=False)
        wait_until(lambda: not _workers(port)["worker_IN_1"][0], 15,
                   "worker_IN_1 to be listed not ready", lambda: str(_workers(port)))
        hold.unlink()
        h.wait_ready(30)
        wait_until(lambda: _all_answer(port, three), 15, "the reimaged worker to answer",
                   lambda: str(_workers(port)))

        # A worker whose port something else took while it was down comes back on
        # another: the web role is told (`changed`), and asks it there.
        old = rpc["port"]
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            h.kill("worker_IN_0")
            h.wait_state("worker_IN_0", "recycling", 10)
            squatter.bind(("127.0.0.1", old))
            squatter.listen()
            h.wait_ready(30)
            moved = wait_until(lambda: _all_answer(port, three), 15,
                               "the moved worker to answer", lambda: str(_workers(port)))
            assert moved["worker_IN_0"][1] != old
            assert h.instance("worker_IN_0")["endpoints"]["rpc"]["port"] == moved[
                "worker_IN_0"][1]
        service.wait_probe("changed worker web_IN_0")

        # A scale-in: the removed workers are no longer listed.
        h.scale("worker", 1)
        wait_until(lambda: _all_answer(port, ["worker_IN_0"]), 15, "one worker left",
                   lambda: str(_workers(port)))


# Each instance answers its view on its internal endpoint `http`: a line per instance,
# id, ready flag and port. on_start holds until the test touches `release` beside the
# probe file, then 50 ms per index: the instances come up one after the other, as a
# start's do on a busy machine, each in a turn of the controller's loop of its own.
VIEWS = HTTP_SITE + """
class View(Site):
    def do_GET(self):
        lines = [f"{i.id} {i.ready} {i.endpoints['http'].port}"
                 for role in RoleEnvironment.roles.values() for i in role.instances]
        self.reply(200, "\\n".join(lines).encode())

class Role(Serving):
    handler = View

    def on_start(self):
        serving = super().on_start()  # its view answers while it waits
        release = os.path.join(os.path.dirname(RoleEnvironment.get_setting("probe")),
                               "release")
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05 * RoleEnvironment.current_instance.index)
        return serving
"""


def _counter(h: ServiceHarness, name: str) -> float:
    for family in text_string_to_metric_families(h.client.request_raw("GET", "/v1/metrics")):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name} in the metrics")


def test_a_start_writes_each_host_a_few_batches_and_every_view_ends_true(
        make_service: MakeService, tmp_path: Path) -> None:
    n = 20
    service = make_service(VIEWS, instances=n, role={"stop_timeout": "5s"},
                           service={"ready_deadline": "90s"}, extra="""
        [roles.web.internal_endpoints.http]
        protocol = "http"
        """)
    with service.harness(run_dir=tmp_path / "run") as h:
        ports = {i["id"]: i["endpoints"]["http"]["port"] for i in h.status()["instances"]}

        def views(ready: bool) -> bool:
            truth = sorted(f"{i} {ready} {p}" for i, p in ports.items())
            return all(sorted(answer_and_body(p, "/")[1].splitlines()) == truth
                       for p in ports.values())

        def shown() -> str:
            return "\n".join(f"{i}: {answer_and_body(p, '/')[1]!r}" for i, p in ports.items())

        # Every host knows every instance, where it listens, from the table it was
        # started with: none of them was sent a record for that.
        wait_until(lambda: views(False), 90, "every host to list every instance", shown)
        before = _counter(h, "rolehost_discovery_messages_total")
        (tmp_path / "release").touch()
        h.wait_ready(60)
        # The last batch each host got is the truth: every instance ready, on its port.
        wait_until(lambda: views(True), 15, "every view to list every instance ready",
                   shown)
        messages = _counter(h, "rolehost_discovery_messages_total")
        records = _counter(h, "rolehost_discovery_records_total")
        encoded = _counter(h, "rolehost_discovery_encoded_total")
        ready = [datetime.fromisoformat(i["ready_since"]).timestamp()
                 for i in h.status()["instances"]]
    # Each host learns each of the n ready flags, n^2 records, in batches at most one an
    # interval apart (one in the first turn): O(n) writes over the spread of the flags,
    # where a write a record and host made it n^2.
    spread = max(ready) - min(ready)
    batches = 2 + spread / min(discovery.MOST, discovery.PER_HOST * n)
    assert records >= n * (n - 1), records
    assert messages <= batches * n, (
        f"{messages:.0f} messages ({before:.0f} before the release) for {n} instances "
        f"ready over {spread:.2f} s; a message a record and host: {n * n}")
    # Each record is serialised once per version (about two over a start: not ready,
    # ready), not once per host it goes to: with every host's table and each batch
    # encoded anew, n^2 and more (each table alone holds the n records).
    assert encoded <= 4 * n, f"{encoded:.0f} records encoded for {n} instances"
