"""The web sample under load: restart every instance, and no request fails."""

import socket
from pathlib import Path

from rolehost.testing import LoadProbe, ServiceHarness

HERE = Path(__file__).parent


def test_restarting_every_instance_under_load_fails_no_request(tmp_path: Path) -> None:
    # The sample listens on 8080; a test must not depend on that port being free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    definition = tmp_path / "rolehost.toml"
    definition.write_text(
        (HERE / "rolehost.toml").read_text()
        .replace("port = 8080", f"port = {port}")
        .replace('entry_point = "web:WebRole"', f'entry_point = "web:WebRole"\napp = "{HERE}"')
    )
    with ServiceHarness(definition) as service:
        service.wait_ready(timeout=60)
        with LoadProbe(service.url("web", "http") + "/hello", clients=4) as load:
            load.wait_requests(100)
            for index in range(3):
                service.restart(f"web/{index}")
            load.wait_requests(load.requests + 100)
        assert load.failures == [], load.report()
