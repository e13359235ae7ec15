"""`rolehost portal`: the web page, in a real browser (headless Chromium) against a real
controller, and its guard against requests the portal's own page did not send."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.browser import Portal, chromium, output, portal, press, shot
from support.cli import rolehost
from support.net import free_port
from support.roles import WEB
from support.service import MakeService, Service

SECRET = "s3cr3t-portal-value"


def _service(make_service: MakeService) -> Service:
    """Two roles over two update domains: `web` behind the balancer (ready a second after
    it starts: a walk long enough to draw), `worker` with a secret setting."""
    port = free_port()
    return make_service(
        WEB + "\nclass Worker(RoleEntryPoint): pass\n", instances=2,
        settings={"warmup": "1,1"}, role={"stop_timeout": "5s"},
        service={"upgrade_domains": 2, "backoff_initial": "0.2s"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}

        [roles.worker]
        entry_point = "roles:Worker"
        app = "app"
        instances = 2
        stop_timeout = "5s"

        [roles.worker.settings]
        api_key = {{ value = "{SECRET}", secret = true }}
        """)


def _request(p: Portal, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _pids(h: ServiceHarness) -> dict[str, int]:
    return {i["id"]: i["pid"] for i in h.status()["instances"]}


def test_the_portal_refuses_what_its_own_page_did_not_send(make_service: MakeService) -> None:
    """No token, a wrong one, a foreign Host (DNS rebinding), a cross-origin POST, a POST
    without the token header: each refused with a page that says how to get in, and no
    instance touched. The right request does reimage."""
    service = _service(make_service)
    with service.harness() as h, portal("-f", str(service.toml), "--run-dir",
                                        str(h.run_dir.path), "--listen",
                                        f"127.0.0.1:{free_port()}") as p:
        h.wait_ready(30)
        before = _pids(h)
        host = {"Host": f"127.0.0.1:{p.port}"}
        cookie = {**host, "Cookie": f"rolehost_portal={p.token}"}
        change = {**cookie, "Origin": p.origin, "X-Rolehost-Token": p.token,
                  "Content-Type": "application/json"}
        body = b'{"instance": "web_IN_0"}'
        status, page = _request(p, "GET", "/", host)
        assert status == 401 and "rolehost portal" in page and "?token=" in page
        assert _request(p, "GET", "/?token=wrong", host)[0] == 403
        assert _request(p, "GET", "/", {**cookie, "Host": f"evil.example:{p.port}"})[0] == 403
        status, answer = _request(p, "GET", f"/?token={p.token}", host)
        assert status == 303  # the token moves to the cookie
        for refused in ({**change, "Origin": "http://evil.example"},  # another site's page
                        {k: v for k, v in change.items() if k != "Origin"},
                        {k: v for k, v in change.items() if k != "X-Rolehost-Token"},
                        {k: v for k, v in change.items() if k != "Cookie"},
                        {**change, "Host": f"evil.example:{p.port}"}):
            status, page = _request(p, "POST", "/act/instance/reimage", refused, body)
            assert status == 403, (refused, page)
            assert "rolehost portal" in page
        assert _request(p, "GET", "/act/instance/reimage", cookie)[0] == 405
        assert _request(p, "PUT", "/act/instance/reimage", change, body)[0] == 405
        assert _pids(h) == before  # nothing changed
        for path in ("/", "/part/instances", "/history", "/logs", "/logs?instance=worker/0",
                     "/part/log", "/part/log?instance=worker/0", "/metrics"):
            status, page = _request(p, "GET", path, cookie)
            assert status == 200 and SECRET not in page, path
        status, answer = _request(p, "POST", "/act/instance/reimage", change, body)
        assert status == 200 and '"web_IN_0: reimage begun"' in answer, answer
        h.wait_replaced("web_IN_0", before["web_IN_0"], 30)
        h.wait_ready(30)

        def act(path: str, form: dict[str, Any]) -> dict[str, Any]:
            status, text = _request(p, "POST", path, change, json.dumps(form).encode())
            assert status == 200, text
            return dict(json.loads(text))

        # The service's actions, in the CLI's words; a refusal in the API's.
        outcome = act("/act/config", {"role": "worker", "assignments": "colour=blue"})
        assert outcome["failure"] is None
        assert sorted(line.split(":")[0] for line in outcome["lines"]) == [
            "worker_IN_0", "worker_IN_1"], outcome
        assert act("/act/walk/next", {})["failure"] == (
            "no walk has run since the controller started")
        refused = act("/act/deploy", {"version": "nope", "rollback": True, "manual": False})
        assert "nope" in refused["failure"], refused
        assert act("/act/scale", {"role": "web", "count": "x"})["failure"] == (
            "count must be a whole number")
        assert act("/act/instance/reboot", {"instance": "web_IN_0"})["failure"] == (
            "no such instance action: reboot")
        status, text = _request(p, "GET", "/part/log", cookie)  # the controller's events
        assert status == 200 and any("web_IN_0: ready -> stopping (reimage: requested "
                                     "through the portal)" in line
                                     for line in json.loads(text)["lines"]), text


def test_portal_listen_address(make_service: MakeService) -> None:
    """`[service] portal` is the default listen address; a bad one is refused naming it."""
    port = free_port()
    service = make_service("class Role(RoleEntryPoint): pass",
                           service={"portal": f"127.0.0.1:{port}"})
    with portal("-f", str(service.toml)) as p:
        assert (p.host, p.port) == ("127.0.0.1", port)
        status, page = _request(p, "GET", "/", {"Host": f"localhost:{port}"})
        assert status == 401
        status, page = _request(p, "GET", "/", {"Host": f"localhost:{port}",
                                                "Cookie": f"rolehost_portal={p.token}"})
        assert status == 503 and "does not answer" in page  # no controller runs: it says so
    bad = rolehost("portal", "-f", str(service.toml), "--listen", "nowhere", "--no-browser")
    assert bad.returncode == 2 and "--listen" in bad.stderr, bad.stderr
    # Without the `portal` extra: which package is missing, and how to install it.
    without = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['starlette'] = None; "
         "from rolehost.cli import main; main()", "portal", "-f", str(service.toml)],
        capture_output=True, text=True, timeout=60)
    assert without.returncode == 1, without.stderr
    assert "starlette is missing" in without.stderr
    assert "pip install 'rolehost[portal]'" in without.stderr


class _OtherSite(BaseHTTPRequestHandler):
    """Another site the user visits: its page posts to the portal, a form and a fetch."""

    target = ""

    def do_GET(self) -> None:
        body = f"""<html><body><form id="f" method="POST"
action="{self.target}/act/instance/reimage" enctype="text/plain">
<input name='{{"instance": "web_IN_1", "x": "' value='"}}'></form>
<script>
fetch("{self.target}/act/instance/reimage", {{method: "POST", mode: "no-cors",
  credentials: "include", body: '{{"instance": "web_IN_1"}}'}})
  .finally(() => document.getElementById("f").submit());
</script></body></html>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _other_site(target: str) -> Iterator[str]:
    _OtherSite.target = target
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtherSite)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_portal_in_a_browser(make_service: MakeService) -> None:
    """Every instance is shown; Reimage asks, then shows the instance stop, start and be
    ready, in the CLI's words; a host-os walk started from the page draws its timeline,
    requests per second under it, and the history links to it; the metrics are charted
    and the controller's events followed; another site's page that posts to the portal
    changes nothing."""
    from selenium.webdriver.common.by import By

    service = _service(make_service)
    with service.harness() as h, portal("-f", str(service.toml), "--run-dir",
                                        str(h.run_dir.path), "--listen",
                                        f"127.0.0.1:{free_port()}") as p, chromium() as driver:
        h.wait_ready(30)
        driver.get(p.url)
        names = ["web_IN_0", "web_IN_1", "worker_IN_0", "worker_IN_1"]

        def row_state(name: str) -> str:
            return str(driver.execute_script(
                "const r = document.querySelector(`tr[data-instance='${arguments[0]}']`);"
                "return r && r.dataset.state;", name))

        wait_until(lambda: all(row_state(n) == "ready" for n in names), 20,
                   "every instance shown ready", lambda: driver.page_source)
        assert SECRET not in driver.page_source

        before = _pids(h)
        question = press(driver, 'tr[data-instance="web_IN_0"] button[data-act$="/reimage"]')
        assert question == "Reimage web_IN_0?"
        wait_until(lambda: "starting -> ready" in output(driver), 60,
                   "the reimage followed to ready", lambda: output(driver))
        out = output(driver)
        assert out.startswith("web_IN_0: reimage begun")  # as `rolehost reimage` says
        assert out.index("ready -> stopping") < out.index("-> starting") < out.index(
            "starting -> ready"), out
        wait_until(lambda: row_state("web_IN_0") == "ready", 20, "web_IN_0 ready in the table")
        assert _pids(h)["web_IN_0"] != before["web_IN_0"]

        with LoadProbe(h.url("web", "http"), clients=2) as load:
            load.wait_requests(50)
            assert press(driver, 'button[data-act="/act/upgrade/host-os"]').startswith(
                "Walk the host-os update")
            wait_until(lambda: "every update domain done" in output(driver), 90,
                       "the walk followed to its end", lambda: output(driver))
        assert load.failures == [], load.report()
        out = output(driver)
        assert "upgrade host-os over 2 update domains" in out
        assert "  UD 1  worker_IN_1      ready" in out  # `rolehost upgrade`'s step lines

        def drawn() -> bool:
            svg = driver.find_elements(By.CSS_SELECTOR, "#walk svg#timeline")
            return bool(svg) and all(driver.find_elements(
                By.CSS_SELECTOR, f'#walk rect.seg[data-instance="{n}"][data-state="stopping"]')
                for n in names) and len(driver.find_elements(
                    By.CSS_SELECTOR, "#walk g.step")) >= 2
        wait_until(drawn, 20, "the walk's timeline", lambda: driver.page_source)
        wait_until(lambda: driver.execute_script(
            "return document.querySelector('#walk pre.walk').dataset.state") == "succeeded"
            and all(row_state(n) == "ready" for n in names), 20,
            "the page to show the walk over", lambda: driver.page_source)
        steps = [g.get_attribute("data-step")
                 for g in driver.find_elements(By.CSS_SELECTOR, "#walk g.step")]
        assert steps[:2] == ["UD 0", "UD 1"], steps
        assert driver.find_elements(By.CSS_SELECTOR, "#walk polyline#requests")
        shot(driver, "portal-timeline.png", driver.find_element(By.ID, "walk"))
        shot(driver, "portal-service.png")

        walk_id = h.status()["walk"]["id"]
        driver.get(f"{p.origin}/history")
        driver.find_element(By.LINK_TEXT, walk_id).click()
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "svg#timeline rect.seg"), 20,
                   "the operation's timeline from the history")
        assert "upgrade host-os" in driver.find_element(By.TAG_NAME, "h1").text

        driver.get(f"{p.origin}/metrics")  # the balancer's figures as small charts
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#charts svg.spark polyline"),
                   20, "the metrics' charts", lambda: driver.page_source)
        assert "web.http" in driver.find_element(By.ID, "charts").text
        driver.get(f"{p.origin}/logs")  # the controller's events, as `rolehost logs` prints
        wait_until(lambda: "web_IN_0: ready -> stopping (reimage: requested through the "
                   "portal)" in driver.find_element(By.ID, "log").text, 20,
                   "the controller's events", lambda: driver.page_source)

        after_walk = _pids(h)
        with _other_site(p.origin) as site:
            driver.get(site)
            wait_until(lambda: "access refused" in driver.page_source, 20,
                       "the other site's form refused", lambda: driver.page_source)
        assert _pids(h) == after_walk  # nothing touched


def test_timeline_segments_start_from_the_state_before_the_window() -> None:
    from rolehost.portal import timeline

    def state(at: str, name: str, value: str) -> dict[str, str]:
        return {"event": "state", "instance": name, "state": value,
                "timestamp": f"2026-01-01T00:00:{at}Z"}

    from rolehost.portal.source import seconds

    t0 = seconds("2026-01-01T00:00:10Z")
    assert t0 is not None
    events = [state("05", "a", "ready"), state("12", "a", "stopping"), state("12", "b", "x"),
              state("13", "a", "starting"), state("15", "a", "ready"), state("30", "a", "failed")]
    assert timeline.segments("a", events, t0, t0 + 10) == [
        (t0, t0 + 2, "ready"), (t0 + 2, t0 + 3, "stopping"), (t0 + 3, t0 + 5, "starting"),
        (t0 + 5, t0 + 10, "ready")]
    assert timeline.segments("c", events, t0, t0 + 10) == [(t0, t0 + 10, "unknown")]
    svg = timeline.render([timeline.Row("a", 0), timeline.Row("<b>", 1)], events, t0, t0 + 10)
    assert svg.count('class="seg"') == 5 and "&lt;b&gt;" in svg and "<b>" not in svg


def test_the_hosts_that_name_the_portal() -> None:
    from rolehost.portal.guard import host_names

    assert host_names("127.0.0.1", 8484) == {"127.0.0.1:8484", "localhost:8484"}
    assert host_names("::1", 80) == {"[::1]:80", "localhost:80"}
    assert host_names("10.0.0.5", 9000) == {"10.0.0.5:9000"}


def test_an_operation_older_than_the_kept_events_is_drawn_from_the_event_log(
        tmp_path: Path) -> None:
    """The controller keeps its last 10,000 events; an older walk's come from the log,
    read again only once it changed."""
    from rolehost.fabric.rundir import RunDir
    from rolehost.portal.source import Source, seconds

    run_dir = RunDir(tmp_path)
    run_dir.logs.mkdir(parents=True)
    log = run_dir.logs / "controller.log"
    lines = [{"seq": n, "event": "state", "instance": "web_IN_0", "state": state,
              "timestamp": f"2026-01-01T00:00:{n:02d}Z"}
             for n, state in ((1, "ready"), (2, "stopping"), (3, "ready"))]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    source = Source(run_dir)
    source.events.append({"seq": 9, "event": "state", "timestamp": "2026-01-01T00:01:00Z"})
    began = seconds("2026-01-01T00:00:01.5Z")
    assert began is not None
    assert [e["seq"] for e in source.events_between(began, began + 1)] == [1, 2]
    first = source._logged()
    assert source._logged() is first  # unchanged: not read again
    with log.open("a") as f:
        f.write(json.dumps({**lines[0], "seq": 4}) + "\n")
    assert [e["seq"] for e in source._logged()] == [1, 2, 3, 4]
