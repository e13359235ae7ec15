"""The shop rehearsed as its team would: a guest-OS walk and a deploy, under load."""

import json
import socket
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from rolehost.testing import LoadProbe, ServiceHarness, wait_until

HERE = Path(__file__).parent


@pytest.fixture
def shop(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The shop on a free port and a private orders database."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "orders.db"
    definition = tmp_path / "rolehost.toml"
    definition.write_text(
        (HERE / "rolehost.toml").read_text()
        .replace("port = 8090", f"port = {port}")
        .replace('orders_db = ""', f'orders_db = "{db}"')
        .replace('entry_point = "web:WebRole"', f'entry_point = "web:WebRole"\napp = "{HERE}"')
        .replace('entry_point = "worker:ShippingWorker"',
                 f'entry_point = "worker:ShippingWorker"\napp = "{HERE}"')
    )
    with ServiceHarness(definition) as service:
        service.wait_ready(timeout=60)
        yield service, db


def place_orders(url: str, count: int) -> None:
    for n in range(count):
        request = urllib.request.Request(f"{url}/orders", data=json.dumps({"item": f"i{n}"})
                                         .encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 201


def test_guest_os_walk_and_deploy_under_load(shop) -> None:  # type: ignore[no-untyped-def]
    service, db = shop
    url = service.url("web", "http")
    with LoadProbe(url + "/products", clients=4) as load:
        load.wait_requests(100)
        place_orders(url, 50)
        assert service.upgrade("guest-os")["state"] == "succeeded"  # os/ wiped: catalog rebuilt
        place_orders(url, 50)
        service.package("v2")
        assert service.deploy("v2")["state"] == "succeeded"
        load.wait_requests(load.requests + 100)
    assert load.failures == [], load.report()

    orders = sqlite3.connect(db)
    wait_until(lambda: orders.execute("SELECT COUNT(*) FROM orders WHERE state = 'shipped'")
               .fetchone()[0] == 100, 60, "every order shipped")
    assert orders.execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 100
