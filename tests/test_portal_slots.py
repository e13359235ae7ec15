"""The portal's staging slot and swap, and its memory column: in a real browser (headless
Chromium) against a real controller, with real requests through the balancer."""

from __future__ import annotations

import http.client
import re
import shutil
from typing import Any

from rolehost.testing import LoadProbe, wait_until
from support.browser import chromium, output, portal, press, shot
from support.cli import rolehost
from support.net import free_port, get
from support.roles import HTTP_SITE
from support.service import MakeService

# Answers its `version` setting; /healthz fails while the file its `sick` setting names
# exists (a staging instance then falls out of rotation: not back, no swap).
SITE = HTTP_SITE + """
class Handler(Site):
    def do_GET(self):
        if self.path == "/healthz" and os.path.exists(RoleEnvironment.get_setting("sick")):
            return self.reply(503, b"sick")
        self.reply(200, RoleEnvironment.get_setting("version").encode())

class Role(Serving):
    handler = Handler
"""


def _pids(status: dict[str, Any]) -> dict[str, int]:
    return {i["id"]: i["pid"] for i in status["instances"]}






def _cell(driver: Any, slot: str, instance: str, column: int) -> str | None:
    """The text of a cell of an instance's row in a slot's table, None without the row."""
    found = driver.execute_script(
        "const r = document.querySelector("
        "`#slot-${arguments[0]} tr[data-instance='${arguments[1]}']`);"
        "return r && r.querySelector(`td.c${arguments[2]}`).textContent;",
        slot, instance, column)
    return None if found is None else str(found)


STATE, MEMORY = 2, 9  # the columns of the instances' table


def test_the_portal_shows_staging_swaps_and_memory(make_service: MakeService) -> None:
    """Each instance's memory is shown, against its role's max_memory, as status says it.
    A version deployed to staging from the page appears beside production with its
    instances, states and staging port; a swap refused (a staging instance not back)
    says why and touches nothing; Swap makes production's port answer the new version,
    under load with no failed request, and the page shows the slots exchanged. A staging
    row's Reimage acts on staging's instance; Delete staging removes it."""
    port, staging_port = free_port(), free_port()
    service = make_service(
        SITE, instances=2, service={"upgrade_domains": 2, "ready_deadline": "30s"},
        role={"stop_timeout": "5s", "max_memory": "512MB"},
        settings={"version": "v1", "sick": ""}, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        staging_port = {staging_port}
        drain_timeout = "5s"
        probe = {{ path = "/healthz", interval = "200ms" }}
        """)
    folder = service.toml.parent
    sick = folder / "v2.sick"
    v2 = folder / "v2" / "rolehost.toml"
    shutil.copytree(folder / "app", v2.parent / "app")
    v2.write_text(service.toml.read_text().replace('version = "v1"', 'version = "v2"')
                  .replace('sick = ""', f'sick = "{sick}"'))

    with service.harness() as h, portal("-f", str(service.toml), "--run-dir",
                                        str(h.run_dir.path), "--listen",
                                        f"127.0.0.1:{free_port()}") as p, chromium() as driver:
        h.wait_ready(30)
        packaged = rolehost("package", "-f", str(v2), "--version", "v2", "--run-dir",
                            str(h.run_dir.path), timeout=120)
        assert packaged.returncode == 0, packaged.stderr
        driver.get(p.url)
        names = ["web_IN_0", "web_IN_1"]

        # Memory: the figure status gives, against the role's 512MB.
        def memory_shown() -> bool:
            return all(re.fullmatch(r"\d+MB of 512MB \(\d+%\)", _cell(
                driver, "production", n, MEMORY) or "") for n in names)
        wait_until(memory_shown, 30, "the memory column", lambda: driver.page_source)
        shown = _cell(driver, "production", "web_IN_0", MEMORY) or ""
        measured = h.status()["instances"][0]
        assert measured["max_memory_bytes"] == 512 * 2**20
        megabytes = measured["memory_bytes"] / 2**20
        assert abs(int(shown.split("MB")[0]) - megabytes) <= max(4.0, megabytes / 4), (
            shown, megabytes)
        assert not driver.find_elements("css selector", "#slot-staging")  # none yet

        # Deploy v2 to staging from the page's deploy form.
        driver.execute_script(
            "document.querySelector('#deploy select[name=version]').value = 'v2';"
            "document.querySelector('#deploy select[name=slot]').value = 'staging';")
        assert press(driver, 'button[data-act="/act/deploy"]').startswith("Deploy")
        wait_until(lambda: "staging: version v2" in output(driver), 60,
                   "the staging deploy's answer", lambda: output(driver))
        assert f"web.http on 127.0.0.1:{staging_port}" in output(driver)  # as the CLI says
        production, staging = _pids(h.status()), _pids(h.client.status("staging"))
        assert set(production.values()).isdisjoint(staging.values())

        def staging_shown() -> bool:
            return all(_cell(driver, "staging", n, STATE) == "ready" for n in names)
        wait_until(staging_shown, 20, "staging's instances in the page",
                   lambda: driver.page_source)
        section = driver.find_element("css selector", "#slot-staging")
        assert section.get_attribute("data-version") == "v2"
        assert f"web.http on 127.0.0.1:{staging_port}" in section.text
        assert f"web.http on 127.0.0.1:{port}" in driver.find_element(
            "css selector", "#slot-production").text
        assert re.fullmatch(r"\d+MB of 512MB \(\d+%\)|- of 512MB",
                            _cell(driver, "staging", "web_IN_0", MEMORY) or ""), (
            driver.page_source)
        assert get(port)[1] == b"v1" and get(staging_port)[1] == b"v2"
        shot(driver, "portal-slots.png")

        # The guard: a swap posted by another site's page is refused, nothing touched.
        connection = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
        connection.request("POST", "/act/swap", body=b"{}", headers={
            "Host": f"127.0.0.1:{p.port}", "Origin": "http://evil.example",
            "Cookie": f"rolehost_portal={p.token}", "X-Rolehost-Token": p.token})
        assert connection.getresponse().status == 403
        connection.close()
        assert _pids(h.status()) == production and get(port)[1] == b"v1"

        # A swap refused: a staging instance out of rotation. Its message, nothing touched.
        sick.touch()
        wait_until(lambda: not any(i["back"] for i in h.client.status("staging")["instances"]),
                   20, "staging out of rotation")
        press(driver, 'button[data-act="/act/swap"]')
        wait_until(lambda: "rolehost: staging instances not back" in output(driver), 20,
                   "the refusal", lambda: output(driver))
        assert _pids(h.status()) == production
        assert _pids(h.client.status("staging")) == staging
        assert get(port)[1] == b"v1"
        assert h.operations()[-1]["outcome"] == "failed"
        sick.unlink()
        wait_until(lambda: all(i["back"] for i in h.client.status("staging")["instances"]),
                   20, "staging back in rotation")

        # The swap, under load: production's port answers v2, no request failed.
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=2) as load:
            load.wait_requests(50)
            question = press(driver, 'button[data-act="/act/swap"]')
            assert "send new requests to version v2" in question, question
            wait_until(lambda: "production: version v2" in output(driver), 20,
                       "the swap's answer", lambda: output(driver))
            done = load.requests
            load.wait_requests(done + 50)
        assert load.failures == [], load.report()
        assert {get(port)[1] for _ in range(6)} == {b"v2"}  # through the balancer
        assert get(staging_port)[1] == b"v1"  # the former production, ready to swap back
        assert _pids(h.status()) == staging and _pids(h.client.status("staging")) == production
        wait_until(lambda: driver.execute_script(
            "const s = document.querySelector('#slot-production');"
            "return s && s.dataset.version") == "v2", 20, "production shown as v2",
            lambda: driver.page_source)
        assert all(_cell(driver, "staging", n, STATE) == "ready" for n in names)
        assert [o["kind"] for o in h.operations()][-2:] == ["swap", "swap"]

        # A staging row's Reimage reimages staging's web_IN_0, not production's, and the
        # progress follows that one.
        production, staging = _pids(h.status()), _pids(h.client.status("staging"))
        question = press(driver, '#slot-staging tr[data-instance="web_IN_0"] '
                                 'button[data-act$="/reimage"]')
        assert question == "Reimage web_IN_0 (staging)?"
        wait_until(lambda: "starting -> ready" in output(driver), 60,
                   "the staging reimage followed to ready", lambda: output(driver))
        wait_until(lambda: all(i["back"] and i["operation"] is None for i in h.client.status(
            "staging")["instances"]), 20, "the staging reimage over")
        assert _pids(h.status()) == production
        now = _pids(h.client.status("staging"))
        assert now["web_IN_0"] != staging["web_IN_0"] and now["web_IN_1"] == staging["web_IN_1"]

        # Delete staging: its section goes, its port closes, production goes on.
        press(driver, 'button[data-act="/act/slot/delete"]')
        wait_until(lambda: "deleted staging: version" in output(driver), 60,
                   "the delete's answer", lambda: output(driver))
        wait_until(lambda: not driver.find_elements("css selector", "#slot-staging"), 20,
                   "staging gone from the page", lambda: driver.page_source)
        assert _pids(h.status()) == production and get(port)[1] == b"v2"


def test_staging_rows_act_on_staging() -> None:
    """A staging row's buttons name their slot (the instance ids are production's), and a
    slot's section shows where it listens; without staging, no swap is offered."""
    from rolehost.portal import pages

    def status(slot: str, version: str) -> dict[str, Any]:
        instance = {"id": "web_IN_0", "update_domain": 0, "state": "ready", "reason": "",
                    "why_not_back": None, "last_error": None, "next_try": None, "back": True,
                    "endpoints": {}, "pid": 7, "restarts": 0, "ready_since": None,
                    "memory_bytes": 3 * 2**20, "max_memory_bytes": None}
        return {"slot": slot, "version": version, "deployment_id": "d" * 32, "capacity": [],
                "cpu": {}, "instances": [instance],
                "balancers": [{"role": "web", "endpoint": "http", "address": "h:1"}]}

    alone = pages.slots(status("production", "v1"), None)
    assert "/act/swap" not in alone and 'data-slot="staging"' not in alone
    assert ">3MB<" in alone and "web.http on h:1" in alone
    both = pages.slots(status("production", "v1"), status("staging", "<v2>"))
    staging = both[both.index('id="slot-staging"'):]
    assert 'data-act="/act/instance/reimage" data-instance="web_IN_0" data-slot="staging"' in (
        staging)
    assert "status-check" not in staging  # the API checks production's instances only
    assert "/act/swap" in staging and "&lt;v2&gt;" in staging and "<v2>" not in both
