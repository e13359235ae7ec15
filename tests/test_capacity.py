"""Capacity advice: redundancy, headroom, and the load left when a domain is down."""

from __future__ import annotations

import json
from typing import Any

from rolehost import definition
from rolehost.fabric import capacity
from rolehost.testing import wait_until
from support.cli import rolehost
from support.roles import IDLE
from support.service import MakeService


def _definition(instances: int, uds: int) -> definition.Definition:
    return definition.parse({"service": {"name": "s", "upgrade_domains": uds},
                             "roles": {"web": {"entry_point": "m:C", "instances": instances}}})


def test_static_advice() -> None:
    assert capacity.static_advice(_definition(1, 2)) == [
        "role web has one instance: it is down during every walk and maintenance event "
        "(the platform's SLA needs two)"]
    assert "it needs 50% of its capacity spare" in capacity.static_advice(_definition(2, 2))[0]
    assert "it needs 20% of its capacity spare" in capacity.static_advice(_definition(5, 5))[0]


def test_load_left_when_the_busiest_domain_is_down() -> None:
    d = _definition(2, 2)
    calm = {"web_IN_0": ("web", 0, 40.0), "web_IN_1": ("web", 1, 45.0)}
    assert capacity.load_warnings(d, calm) == []
    busy = {"web_IN_0": ("web", 0, 70.0), "web_IN_1": ("web", 1, 60.0)}
    [warning] = capacity.load_warnings(d, busy)
    assert warning.startswith("role web: with update domain 0 down, the other 1 instance(s) "
                              "would each carry 130% of a core")


def test_status_warns_for_a_loaded_two_instance_role(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def run(self):
                # About 90% of a core each: 180% in all, well past the 100% that one
                # instance could carry alone, even when other work on the machine
                # takes some of the CPU away from them (at 60% each, it did in CI).
                while not RoleEnvironment.is_stopping:
                    end = time.perf_counter() + 0.09
                    while time.perf_counter() < end:
                        pass
                    time.sleep(0.01)
        """,
        instances=2, service={"upgrade_domains": 2},
    )
    with service.harness() as h:
        h.wait_ready(30)

        def warned() -> dict[str, Any] | None:
            status = h.status()
            return status if any("would each carry" in a for a in status["capacity"]) else None

        status = wait_until(warned, 20, "a load warning")
        [warning] = [a for a in status["capacity"] if "would each carry" in a]
        assert "role web: with update domain" in warning
        # The figures the warning came from, in the same answer.
        assert set(status["cpu"]) == {"web_IN_0", "web_IN_1"}
        assert sum(status["cpu"].values()) >= 99.9  # over 100, each figure rounded to 0.1


def test_status_and_check_flag_a_single_instance(make_service: MakeService) -> None:
    one = ("role web has one instance: it is down during every walk and maintenance event "
           "(the platform's SLA needs two)")
    service = make_service(IDLE)
    with service.harness() as h:
        h.wait_ready(30)
        assert one in h.status()["capacity"]
    # `check` says it before its rehearsal, in its text and in its JSON report.
    checked = rolehost("check", "-f", str(service.toml), timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"capacity: {one}" in checked.stdout.splitlines()
    report = rolehost("check", "--json", "-f", str(service.toml), timeout=120)
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["capacity"] == [one]
