"""The FastAPI sample under load: restart and reimage an instance, and no request fails."""

import socket
from pathlib import Path

from rolehost.testing import LoadProbe, ServiceHarness

HERE = Path(__file__).parent


def test_the_catalog_is_served_through_a_restart_and_a_reimage(tmp_path: Path) -> None:
    # The sample listens on 8070; a test must not depend on that port being free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    definition = tmp_path / "rolehost.toml"
    definition.write_text(
        (HERE / "rolehost.toml").read_text()
        .replace("port = 8070", f"port = {port}")
        .replace("instances = 2", f'instances = 2\napp = "{HERE}"')
    )
    with ServiceHarness(definition) as service:
        service.wait_ready(timeout=60)
        with LoadProbe(service.url("web", "http") + "/catalog", clients=4) as load:
            load.wait_requests(50)
            service.restart("web/0")
            service.reimage("web/1")
            load.wait_requests(load.requests + 50)
        assert load.failures == [], load.report()
        assert '"GET /catalog HTTP/1.1" 200' in service.logs("web/0")
