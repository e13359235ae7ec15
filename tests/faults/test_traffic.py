"""Fault 17: a backend closes connections mid-response while clients load the balancer."""

from __future__ import annotations

from rolehost.testing import LoadProbe
from support.faults import Bystander, endpoint, role
from support.net import free_port
from support.service import MakeService

CUTTING = """
import itertools, socket
served = itertools.count()

def cut(handler):
    handler.close_connection = True
    handler.wfile.flush()
    handler.connection.shutdown(socket.SHUT_RDWR)

def answer(handler):
    n = next(served)
    if faulty() and n % 10 == 3:  # the request was read; no byte of an answer is sent
        probe("drop")
        return cut(handler)
    if faulty() and n % 10 == 7:  # half of the body, then the connection is closed
        handler.send_response(200)
        handler.send_header("Content-Length", "10000")
        handler.end_headers()
        handler.wfile.write(b"x" * 5000)
        probe("cut")
        return cut(handler)
    handler.reply(200, RoleEnvironment.current_instance.id.encode())
"""


def test_backend_closes_connections_mid_response(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(role(CUTTING, web=True), instances=2, extra=endpoint(port))
    with service.harness() as h:
        bystander = Bystander(h)
        pid = h.wait_state("web/0", "ready", 30)["pid"]
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=4) as load:
            load.wait_requests(2000, timeout=60)
        report = load.report()
        cuts, drops = service.count("cut"), service.count("drop")
        assert cuts >= 50 and drops >= 50, (cuts, drops)
        # A response that was half sent cannot be taken back: each cut is one failure,
        # seen by the client as a short body. Nothing else fails: a connection closed
        # before any byte of the answer is retried on the other instance.
        assert len(load.failures) == cuts, report
        assert all(f.startswith("IncompleteRead") for f in load.failures), report
        row = h.instance("web/0")  # closing connections is not a crash
        assert (row["state"], row["pid"], row["restarts"]) == ("ready", pid, 0)
        bystander.check()
