"""The staging slot and the VIP swap: a second deployment beside production, on the
endpoints' staging ports, and a swap (and a swap back) under steady keep-alive load."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rolehost.client import ApiError
from rolehost.testing import ServiceHarness, wait_until
from support.cli import rolehost
from support.net import free_port, get
from support.roles import HTTP_SITE
from support.service import MakeService, Service

# Answers its `version` setting and instance id; /healthz fails while the file named by
# its `sick` setting exists.
SITE = HTTP_SITE + """
class Handler(Site):
    def do_GET(self):
        if self.path == "/healthz" and os.path.exists(RoleEnvironment.get_setting("sick")):
            return self.reply(503, b"sick")
        version = RoleEnvironment.get_setting("version")
        self.reply(200, f"{version} {RoleEnvironment.current_instance.id}".encode())

class Role(Serving):
    handler = Handler

    def on_start(self):
        serving = super().on_start()
        print("serving", RoleEnvironment.get_setting("version"), flush=True)
        return serving

    def on_stop(self):
        super().on_stop()
        if os.path.exists(RoleEnvironment.get_setting("sick") + ".hang"):
            time.sleep(60)  # past stop_timeout: the stop is cut short
"""


@dataclass
class Site:
    service: Service
    port: int
    staging_port: int

    def copy(self, name: str, **replace: str) -> Path:
        """A copy of the service in folder `name` (its app too), its settings saying
        `name`, and each of `replace` applied to its definition."""
        folder = self.service.toml.parent / name
        shutil.copytree(self.service.toml.parent / "app", folder / "app")
        text = self.service.toml.read_text().replace('version = "v1"', f'version = "{name}"')
        text = text.replace(str(self.sick("v1")), str(self.sick(name)))
        for old, new in replace.items():
            text = text.replace(old, new)
        (folder / "rolehost.toml").write_text(text)
        return folder / "rolehost.toml"

    def sick(self, version: str) -> Path:
        return self.service.toml.parent / f"{version}.sick"


def make_site(make_service: MakeService, stop_timeout: str = "5s") -> Site:
    port, staging_port = free_port(), free_port()
    service = make_service(
        SITE, instances=2, service={"upgrade_domains": 2, "ready_deadline": "30s"},
        role={"stop_timeout": stop_timeout}, settings={"version": "v1", "sick": ""}, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        staging_port = {staging_port}
        queue_timeout = "2s"
        drain_timeout = "5s"
        probe = {{ path = "/healthz", interval = "200ms" }}
        """)
    site = Site(service, port, staging_port)
    toml = service.toml.read_text().replace('sick = ""', f'sick = "{site.sick("v1")}"')
    service.toml.write_text(toml)
    return site


@dataclass
class Load:
    """Keep-alive clients on one port, each answer kept with when its request began."""

    port: int
    clients: int = 4
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)

    def _client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                body = response.read().decode()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                continue
            if response.status != 200:
                self.failures.append(f"HTTP {response.status}: {body}")
            self.answers.append((began, body))
        connection.close()

    def since(self, moment: float) -> list[str]:
        return [body for began, body in list(self.answers) if began > moment]

    def wait_since(self, moment: float, count: int) -> list[str]:
        wait_until(lambda: len(self.since(moment)) >= count, 20, f"{count} answers")
        return self.since(moment)


def pids(status: dict[str, Any]) -> dict[str, int]:
    return {i["id"]: i["pid"] for i in status["instances"]}


def cli(h: ServiceHarness, *args: str) -> Any:
    done = rolehost(*args, "--run-dir", str(h.run_dir.path), timeout=120)
    return done


def test_staging_then_swap_and_back_under_load(make_service: MakeService) -> None:
    site = make_site(make_service)
    with site.service.harness() as h:
        h.wait_ready(30)
        v2 = site.copy("v2")
        done = cli(h, "package", "-f", str(v2), "--version", "v2")
        assert done.returncode == 0, done.stderr
        done = cli(h, "deploy", "v2", "--slot", "staging")
        assert done.returncode == 0, done.stderr
        assert f"web.http on 127.0.0.1:{site.staging_port}" in done.stdout, done.stdout
        assert get(site.port)[1].startswith(b"v1 ") and get(site.staging_port)[1].startswith(
            b"v2 ")
        production, staging = h.client.status(), h.client.status("staging")
        first = production["version"]  # the package `start` made: a content hash
        assert production["slot"] == "production" and production["slots"]["staging"][
            "version"] == "v2"
        assert (staging["slot"], staging["version"]) == ("staging", "v2")
        assert staging["deployment_id"] != production["deployment_id"]
        assert set(pids(production).values()).isdisjoint(pids(staging).values())
        # Its own disks and logs, under its deployment's folder
        assert all(staging["deployment_id"] in i["dirs"]["root"] and staging["deployment_id"]
                   in i["log"] for i in staging["instances"]), staging["instances"]
        shown = cli(h, "status", "--slot", "staging")
        assert "> staging    version v2" in shown.stdout, shown.stdout

        with Load(site.port) as load:
            load.wait_since(0, 20)
            done = cli(h, "swap")
            swapped = time.monotonic()
            assert done.returncode == 0, done.stderr
            assert "production: version v2" in done.stdout, done.stdout
            after = load.wait_since(swapped, 40)
            assert all(body.startswith("v2 ") for body in after), after
            # The former production goes on, on the staging port, ready for a swap back.
            assert get(site.staging_port)[1].startswith(b"v1 ")
            assert pids(h.client.status()) == pids(staging)
            assert pids(h.client.status("staging")) == pids(production)
            # Each deployment's logs go with it.
            shown = cli(h, "logs", "web/0").stdout
            assert "serving v2" in shown and "serving v1" not in shown, shown
            assert "serving v1" in cli(h, "logs", "web/0", "--slot", "staging").stdout
            # And the harness's: it read the first production's log still.
            assert "serving v2" in h.logs("web/0") and "serving v1" not in h.logs("web/0")
            assert "serving v1" in h.logs("web/1", slot="staging")
            done = cli(h, "swap")
            back = time.monotonic()
            assert done.returncode == 0, done.stderr
            after = load.wait_since(back, 40)
            assert all(body.startswith("v1 ") for body in after), after
        assert load.failures == [], load.failures
        assert len(load.answers) > 80
        assert pids(h.client.status()) == pids(production)
        assert get(site.staging_port)[1].startswith(b"v2 ")

        # The slot in the history, the events and the metrics.
        ops = [(o["kind"], o["outcome"], o["arguments"]) for o in h.operations()]
        assert ops[-3:] == [("deploy v2", "succeeded", {"version": "v2", "slot": "staging"}),
                            ("swap", "succeeded", {"production": "v2", "staging": first}),
                            ("swap", "succeeded", {"production": first, "staging": "v2"})], ops
        events = h.events()
        assert any(e["event"] == "state" and e.get("slot") == "staging" for e in events)
        assert [e["production"] for e in events if e["event"] == "swapped"] == ["v2", first]
        metrics = h.client.request_raw("GET", "/v1/metrics")
        labels = f'deployment="{staging["deployment_id"]}",slot="staging",version="v2"'
        assert f"rolehost_slot_instances{{{labels}}} 2.0" in metrics, metrics
        assert 'endpoint="web.http@staging"' in metrics

        # Operations take --slot: the staging deployment's instances only.
        done = cli(h, "config", "set", "web", "version=v2b", "--slot", "staging")
        assert done.returncode == 0, done.stderr
        assert get(site.staging_port)[1].startswith(b"v2b ")
        assert get(site.port)[1].startswith(b"v1 ")
        assert cli(h, "scale", "web", "3", "--slot", "staging").returncode == 0
        restarted = cli(h, "restart", "web/0", "--slot", "staging", "--wait")
        assert restarted.returncode == 0, restarted.stderr
        walked = cli(h, "upgrade", "agent", "--slot", "staging")
        assert walked.returncode == 0, walked.stderr
        now = h.client.status("staging")
        assert sorted(pids(now)) == ["web_IN_0", "web_IN_1", "web_IN_2"]
        assert set(pids(now).values()).isdisjoint(pids(staging).values())  # all restarted
        assert pids(h.client.status()) == pids(production)
        assert now["walk"]["domains"] == [["web_IN_0", "web_IN_2"], ["web_IN_1"]], now["walk"]
        ops = [(o["kind"], o["arguments"].get("slot")) for o in h.operations()]
        assert ops[-4:] == [("config web", "staging"), ("scale web", "staging"),
                            ("restart", "staging"), ("upgrade agent", "staging")], ops

        done = cli(h, "delete", "--slot", "staging")
        assert done.returncode == 0, done.stderr
        assert list(h.client.status()["slots"]) == ["production"]
        assert pids(h.client.status()) == pids(production)
        with pytest.raises(OSError):
            get(site.staging_port, timeout=2)
        assert not any(Path(i["dirs"]["root"]).exists() for i in staging["instances"])
        assert h.operations()[-1]["kind"] == "delete"


def test_refusals_touch_nothing(make_service: MakeService) -> None:
    site = make_site(make_service)
    with site.service.harness() as h:
        h.wait_ready(30)
        production = pids(h.client.status())

        def untouched(staging: dict[str, int] | None = None) -> None:
            assert pids(h.client.status()) == production
            assert get(site.port)[1].startswith(b"v1 ")
            if staging is None:
                assert list(h.client.status()["slots"]) == ["production"]
            else:
                assert pids(h.client.status("staging")) == staging

        def refused(*args: str, code: int = 2) -> str:
            done = cli(h, *args)
            assert done.returncode == code, (done.stdout, done.stderr)
            return done.stderr

        assert "no staging deployment to swap" in refused("swap")
        untouched()

        # No staging_port: refused in preflight, by its key path.
        bare = site.copy("bare", **{f"staging_port = {site.staging_port}\n": ""})
        assert cli(h, "package", "-f", str(bare), "--version", "bare").returncode == 0
        error = refused("deploy", "bare", "--slot", "staging")
        assert "roles.web.endpoints.http.staging_port" in error, error
        untouched()

        # A staging port production listens on, or that something else listens on.
        clash = site.copy("clash", **{f"port = {site.port}\n": f"port = {free_port()}\n",
                                      f"staging_port = {site.staging_port}":
                                      f"staging_port = {site.port}"})
        assert cli(h, "package", "-f", str(clash), "--version", "clash").returncode == 0
        error = refused("deploy", "clash", "--slot", "staging")
        assert f"staging_port = {site.port} is production's port for web.http" in error, error
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = site.copy("busy", **{f"staging_port = {site.staging_port}":
                                        f"staging_port = {taken.getsockname()[1]}"})
            assert cli(h, "package", "-f", str(busy), "--version", "busy").returncode == 0
            assert "cannot listen on" in refused("deploy", "busy", "--slot", "staging")
        # The user's balancer sends to fixed ports per instance index: no second deployment.
        external = site.copy("ext", **{'queue_timeout = "2s"': 'queue_timeout = "2s"\n'
                                       'balancer = "external"\ninstance_port = 2000\n'
                                       'readiness_port = 4000'})
        assert cli(h, "package", "-f", str(external), "--version", "ext").returncode == 0
        assert "has no staging slot" in refused("deploy", "ext", "--slot", "staging")
        # Nor do an instance endpoint's public ports, one per instance index.
        debug = site.copy("debug")
        debug.write_text(debug.read_text() + '[roles.web.instance_endpoints.debug]\n'
                         'public_ports = "6000-6001"\n')  # below the ports free_port gives
        assert cli(h, "package", "-f", str(debug), "--version", "debug").returncode == 0
        assert "has no staging slot" in refused("deploy", "debug", "--slot", "staging")
        untouched()

        assert cli(h, "package", "-f", str(site.copy("v2")), "--version", "v2").returncode == 0
        assert cli(h, "deploy", "v2", "--slot", "staging").returncode == 0
        staging = pids(h.client.status("staging"))
        assert "holds version v2 already" in refused("deploy", "v2", "--slot", "staging")
        untouched(staging)

        # A staging instance out of rotation (its probe fails): not back, no swap.
        site.sick("v2").touch()
        wait_until(lambda: not any(i["back"] for i in h.client.status("staging")["instances"]),
                   20, "staging out of rotation")
        error = refused("swap", code=1)
        assert "staging instances not back" in error and "web_IN_0" in error, error
        untouched(staging)
        site.sick("v2").unlink()

        # Other input endpoints (a protocol changed): no swap.
        assert cli(h, "delete", "--slot", "staging").returncode == 0
        tcp = site.copy("tcp", **{'queue_timeout = "2s"': 'queue_timeout = "2s"\nprotocol = "tcp"'})
        assert cli(h, "package", "-f", str(tcp), "--version", "tcp").returncode == 0
        assert cli(h, "deploy", "tcp", "--slot", "staging").returncode == 0
        staging = pids(h.client.status("staging"))
        error = refused("swap", code=1)
        assert "web.http (http)" in error and "web.http (tcp)" in error, error
        untouched(staging)
        assert get(site.staging_port)[1].startswith(b"tcp ")

        refusals = [o for o in h.operations() if o["outcome"] == "failed"]
        assert [o["kind"] for o in refusals] == [
            "swap", "deploy bare", "deploy clash", "deploy busy", "deploy ext", "deploy debug",
            "deploy v2", "swap", "swap"
        ], refusals
        with pytest.raises(ApiError, match="no slot"):
            h.client.status("blue")
        json.dumps(h.client.status("staging"))


def test_a_stop_cut_short_in_one_slot_names_that_slots_instances(
        make_service: MakeService) -> None:
    """The instances whose stop was cut short were keyed by instance id alone: the twins
    of production and staging (web_IN_0 in each) shared an entry, and the report did not
    say which deployment's cleanup may be incomplete. Now: slot, deployment, id."""
    site = make_site(make_service, stop_timeout="1s")
    with site.service.harness() as h:
        h.wait_ready(30)
        assert cli(h, "package", "-f", str(site.copy("v2")), "--version", "v2").returncode == 0
        assert cli(h, "deploy", "v2", "--slot", "staging").returncode == 0
        staging = h.client.status("staging")["deployment_id"]
        Path(f"{site.sick('v2')}.hang").touch()  # staging's on_stop overruns; production's not
        stopped = cli(h, "stop", "-f", str(site.service.toml))
        assert stopped.returncode == 3, (stopped.stdout, stopped.stderr)
        assert h.wait_controller_exit(30) == 3
    head, *lines = stopped.stderr.splitlines()
    assert head == "rolehost: the stop was cut short; cleanup may be incomplete:", head
    named = {line.strip().partition(": ")[0] for line in lines}
    assert named == {f"staging/{staging}/web_IN_0", f"staging/{staging}/web_IN_1"}, lines
