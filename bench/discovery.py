"""What discovery costs over a start: the `peers` messages the controller writes to hosts.

    python bench/discovery.py [--sizes 10,20,40,80] [--json out.json] [--keep]

For each N, a service of N instances of a role with an internal endpoint, on which each
instance answers its view of the service (`RoleEnvironment.roles`: every instance's id,
ready flag and port). `rolehost start --detach`, then:

- all ready: from the start to every instance ready;
- views: from all ready to every instance's view listing every instance ready, on the
  port the controller gave it (each view is asked every 20 ms);
- messages and records: `rolehost_discovery_messages_total` (one per host a batch goes
  to) and `rolehost_discovery_records_total` (records in them, once per host), read once
  the views are complete, and divided by N and by N^2.

A start sends each instance's records to every host: N^2 records at least, unless a host
starts after the record changed (its first view is the whole table). What discovery can
keep to O(N) is the number of messages, each a write, a read and a wake-up of the host.
Figures are reported; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import socket
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    BenchError,
    Controller,
    closing_sections,
    load_average,
    machine,
    over_sizes,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

SIZES = (10, 20, 40, 80)

ROLE = textwrap.dedent('''\
    import socketserver
    import threading

    from rolehost import RoleEntryPoint, RoleEnvironment


    class View(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            lines = [f"{i.id} {i.ready} {i.endpoints['view'].port}"
                     for role in RoleEnvironment.roles.values() for i in role.instances]
            self.request.sendall("\\n".join(lines).encode())


    class Viewer(RoleEntryPoint):
        def on_start(self) -> bool:
            view = RoleEnvironment.current_instance.endpoints["view"]
            socketserver.ThreadingTCPServer.allow_reuse_address = True
            self.server = socketserver.ThreadingTCPServer((view.host, view.port), View)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
            return True

        def run(self) -> None:
            RoleEnvironment.wait_for_stop()

        def on_stop(self) -> None:
            self.server.shutdown()
            self.server.server_close()
    ''')


def definition(n: int) -> str:
    return textwrap.dedent(f"""\
        [service]
        name = "discovery"
        ready_deadline = "300s"

        [roles.viewer]
        entry_point = "viewer:Viewer"
        app = "app"
        instances = {n}
        stop_timeout = "5s"
        [roles.viewer.internal_endpoints.view]
        """)


@dataclass
class Size:
    n: int
    ready_s: float = 0.0
    views_s: float = 0.0
    messages: float = 0.0
    records: float = 0.0
    error: str | None = None


def view(port: int) -> list[str]:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return []
    return sorted(data.decode().splitlines())


def counter(rh: Controller, name: str) -> float:
    for family in text_string_to_metric_families(rh.client.request_raw("GET", "/v1/metrics")):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise BenchError(f"no {name} in the metrics")


def measure(work: Path, n: int) -> Size:
    root = work / f"n{n}"
    (root / "app").mkdir(parents=True)
    (root / "app" / "viewer.py").write_text(ROLE)
    rh = Controller(root, definition(n), client_timeout=60)
    size = Size(n)
    began = time.monotonic()
    rh.start(timeout=600)
    try:
        ready = lambda: (rh.instances() if all(i["state"] == "ready"  # noqa: E731
                                               for i in rh.instances()) else None)
        instances = wait_until("all ready", 600, ready, 0.05)
        size.ready_s = time.monotonic() - began
        ports = {i["id"]: i["endpoints"]["view"]["port"] for i in instances}
        truth = sorted(f"{i} True {p}" for i, p in ports.items())
        complete = lambda: all(view(p) == truth for p in ports.values()) or None  # noqa: E731
        wait_until("every view complete", 60, complete, 0.02)
        size.views_s = time.monotonic() - began - size.ready_s
        size.messages = counter(rh, "rolehost_discovery_messages_total")
        size.records = counter(rh, "rolehost_discovery_records_total")
    finally:
        rh.stop()
    return size


def markdown(sizes: list[Size], details: dict[str, str], errors: list[str],
             survivors: list[str]) -> str:
    lines = ["# Discovery over a start of N instances", "",
             "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in details.items()), "",
             "| N | all ready s | views s | messages | messages / N | messages / N^2 "
             "| records | records / N^2 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sizes:
        if s.error:
            lines.append(f"| {s.n} | **{s.error}** |" + " |" * 6)
            continue
        lines.append(f"| {s.n} | {s.ready_s:.2f} | {s.views_s:.2f} | {s.messages:.0f} "
                     f"| {s.messages / s.n:.1f} | {s.messages / s.n ** 2:.2f} "
                     f"| {s.records:.0f} | {s.records / s.n ** 2:.2f} |")
    lines += closing_sections(errors, survivors, "every controller was stopped with `rolehost "
                              "stop`; no process the bench started survived (psutil, by "
                              "environment token).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    details = machine({"load average at start (1/5/15 min)": load_average()})

    def one(work: Path, n: int) -> Size:
        try:
            return measure(work, n)
        except BenchError as exc:  # this size failed; the next may not
            return Size(n, error=str(exc))

    run = over_sizes("discovery", [int(s) for s in args.sizes.split(",")], one, details,
                     args.keep)
    print(markdown(run.results, details, run.errors, run.survivors))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in run.results], indent=2) + "\n")


if __name__ == "__main__":
    main()
