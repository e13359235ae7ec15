"""Instance input endpoints (the platform's InstanceInputEndpoint): instance `i` answers
on the `i`-th public port itself, with no balancer."""

from __future__ import annotations

from pathlib import Path

from rolehost.testing import wait_until
from support.cli import rolehost
from support.net import answer_and_body, free_ports
from support.roles import HTTP_SITE
from support.service import MakeService

# Each instance answers its own id on its instance endpoint.
ANSWERS_ITS_ID = HTTP_SITE + """
class Answer(Site):
    def do_GET(self):
        self.reply(200, RoleEnvironment.current_instance.id.encode())

class Role(Serving):
    handler, endpoint = Answer, "debug"
"""


def test_each_instance_answers_on_its_own_port(make_service: MakeService,
                                               tmp_path: Path) -> None:
    first = free_ports(3)
    service = make_service(ANSWERS_ITS_ID, instances=2, role={"stop_timeout": "5s"}, extra=f"""
        [roles.web.instance_endpoints.debug]
        public_ports = "{first}-{first + 2}"
        protocol = "http"
        """)
    with service.harness(run_dir=tmp_path / "run") as h:
        h.wait_ready(30)
        for index in (0, 1):
            assert answer_and_body(first + index, "/") == (200, f"web_IN_{index}")
        debug = h.instance("web_IN_1")["endpoints"]["debug"]
        assert (debug["kind"], debug["port"], debug["protocol"]) == ("instance", first + 1,
                                                                      "http")

        # A restart of one leaves the other answering, in the same process, throughout.
        other = h.instance("web_IN_1")["pid"]
        h.restart("web_IN_0", wait=False)
        seen = []

        def restarted() -> bool:
            seen.append(answer_and_body(first + 1, "/"))
            instance = h.instance("web_IN_0")
            return bool(instance["back"] and instance["restarts"] == 1)

        wait_until(restarted, 30, "web_IN_0 to be back after its restart")
        assert set(seen) == {(200, "web_IN_1")}
        assert h.instance("web_IN_1")["pid"] == other
        assert answer_and_body(first, "/") == (200, "web_IN_0")

        # Up to the range's end, a scale-out gives the new instance the next port.
        h.scale("web", 3)
        h.wait_ready(30)
        assert answer_and_body(first + 2, "/") == (200, "web_IN_2")

        # Past it, it is refused, and nothing is touched.
        pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
        recorded = len(h.operations())
        refused = rolehost("scale", "web", "4", "-f", str(service.toml),
                           "--run-dir", str(h.run_dir.path))
        assert refused.returncode == 2, refused.stderr
        assert ("web can run at most 3 instances: roles.web.instance_endpoints.debug."
                "public_ports has 3 ports") in refused.stderr
        assert {i["id"]: i["pid"] for i in h.status()["instances"]} == pids
        assert len(h.operations()) == recorded  # not even begun
