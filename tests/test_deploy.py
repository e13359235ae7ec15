"""Versioned deploys: packages, a preflight that touches nothing, walks, rollback."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rolehost.client import ApiError
from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.cli import rolehost
from support.domains import assert_one_domain_down_at_a_time
from support.net import free_port
from support.roles import WEB
from support.service import MakeService, Service

ROLE = """
VERSION = "v1"

class Role(RoleEntryPoint):
    def on_start(self):
        marker = RoleEnvironment.os_dir / "marker"
        probe(f"{VERSION} os_kept={marker.exists()}")
        marker.touch()
        return True
"""


def edit(service: Service, old: str, new: str) -> None:
    code = service.toml.parent / "app" / "roles.py"
    code.write_text(code.read_text().replace(old, new))


def pids(h: ServiceHarness) -> dict[str, int]:
    return {i["id"]: i["pid"] for i in h.status()["instances"]}


def test_deploy_walks_the_new_version_in(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        started = h.status()["version"]
        h.package("v1")
        edit(service, 'VERSION = "v1"', 'VERSION = "v2"')
        assert h.package("v2")["version"] == "v2"
        assert h.package()["version"]  # a content hash by default
        walk = h.deploy("v2")
        assert walk["state"] == "succeeded" and walk["label"] == "deploy v2"
        assert sorted(service.probes()[2:]) == ["v2 os_kept=True web_IN_0",
                                                "v2 os_kept=True web_IN_1"]
        assert h.status()["version"] == "v2"
        [record] = h.operations()
        assert record["arguments"] == {"version": "v2", "previous": started,
                                       "rollback": True, "mode": "auto"}, record
        assert record["instances"] == ["web_IN_0", "web_IN_1"], record


def test_a_deploy_brings_the_package_instance_count(make_service: MakeService) -> None:
    # As a .cscfg does on the platform, a package carries its instance count: a scale
    # since the package was made does not stop a deploy, which scales back to it. Only
    # the instances the package keeps are walked; the others stop (or start, on the new
    # version) once every domain has moved.
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        h.scale("web", 3)
        h.wait_ready(30)
        edit(service, 'VERSION = "v1"', 'VERSION = "v2"')
        h.package("v2")  # instances = 2, as rolehost.toml still says
        walk = h.deploy("v2")
        assert walk["state"] == "succeeded", walk
        assert walk["domains"] == [["web_IN_0"], ["web_IN_1"]], walk  # web_IN_2 not walked
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0", "web_IN_1"]
        assert not [p for p in service.probes() if p.startswith("v2") and "web_IN_2" in p]

        h.scale("web", 1)
        edit(service, 'VERSION = "v2"', 'VERSION = "v3"')
        h.package("v3")
        walk = h.deploy("v3")
        assert walk["state"] == "succeeded", walk
        assert walk["domains"] == [["web_IN_0"], []], walk
        h.wait_ready(30)
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0", "web_IN_1"]
        assert h.status()["version"] == "v3"
        assert service.probes()[-1].startswith("v3 ") and "web_IN_1" in service.probes()[-1]
        ops = h.operations()
        assert [(o["kind"], o["outcome"]) for o in ops] == [
            ("scale web", "succeeded"), ("deploy v2", "succeeded"), ("scale web", "succeeded"),
            ("scale web", "succeeded"), ("deploy v3", "succeeded"), ("scale web", "succeeded"),
        ], ops
        assert ops[2]["arguments"]["cause"] == "deploy v2" and ops[2]["instances"] == [
            "web_IN_2"], ops[2]
        assert ops[5]["arguments"]["cause"] == "deploy v3" and ops[5]["instances"] == [
            "web_IN_1"], ops[5]


@pytest.mark.parametrize("problem", ["missing", "import", "incompatible", "service",
                                     "invalid"])
def test_a_failed_preflight_touches_nothing(
    make_service: MakeService, tmp_path: Path, problem: str
) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        before = pids(h)
        if problem == "import":
            edit(service, "class Role", "import not_a_module\nclass Role")
        elif problem == "incompatible":  # another role: instance counts are deployable
            service.toml.write_text(service.toml.read_text().replace("roles.web", "roles.api"))
        elif problem == "service":  # service-wide settings are read at start only
            service.toml.write_text(service.toml.read_text().replace(
                "[service]", '[service]\nready_deadline = "10m"'))
        if problem != "missing":
            h.package("bad")
        if problem == "invalid":  # a package whose definition broke in the store
            stored = h.run_dir.path / "packages/bad/rolehost.toml"
            stored.write_text(stored.read_text().replace("[service]", "[service]\nnope = 1"))
        began = time.monotonic()
        with pytest.raises(ApiError) as failed:
            h.deploy("bad")
        seconds = time.monotonic() - began
        message = str(failed.value)
        expected = {
            "missing": f"no package 'bad' (available: {h.status()['version']};",
            "import": "No module named 'not_a_module'",
            "incompatible": "roles differ (web running, api in the package)",
            "service": "service.ready_deadline differs (1800.0 running, 600.0 in the package)",
            "invalid": "service.nope: unknown key",
        }[problem]
        assert expected in message
        # The status says why; the kind what the status cannot (409 is also "another
        # operation is under way"): refused by the preflight, every instance untouched.
        status = {"missing": 404, "incompatible": 409, "service": 409}.get(problem, 422)
        assert (failed.value.status, failed.value.kind) == (status, "preflight")
        if problem in ("incompatible", "service"):
            assert "A fresh start is needed" in message
        assert seconds < 1.5 if problem == "import" else seconds < 0.5
        assert pids(h) == before
        assert not [e for e in h.events() if e["event"] == "maintenance"]
        [record] = h.operations()
        assert (record["kind"], record["outcome"]) == ("deploy bad", "failed")
        assert record["arguments"] == {"version": "bad", "previous": h.status()["version"]}
        assert record["instances"] == []


def test_a_version_that_fails_is_rolled_back(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2,
                                                      "backoff_initial": "5s"})
    with service.harness() as h:
        h.wait_ready(30)
        untouched = h.instance("web/1")["pid"]
        edit(service, 'probe(f"{VERSION}',
             'raise RuntimeError("v2 is broken")\n        probe(f"{VERSION}')
        h.package("v2")
        walk = h.deploy("v2")
        assert walk["state"] == "rolled back"
        assert "v2 is broken" in walk["error"] and "rolled back 1 of 1" in walk["error"], walk
        assert walk["progress"] == {"web_IN_0": "rolled back", "web_IN_1": "pending"}
        h.wait_ready(30)
        assert h.instance("web/1")["pid"] == untouched
        assert service.probes()[-1] == "v1 os_kept=True web_IN_0"  # the old version serves
        [record] = h.operations()
        assert record["outcome"] == "failed"
        assert h.status()["version"] not in ("", "v2")  # still the package start made
        # The record says what was deployed over what, and lists only the instance moved:
        # web_IN_1, in the domain never reached, had no deploy.
        assert (record["arguments"]["version"], record["arguments"]["previous"]) == (
            "v2", h.status()["version"]), record
        assert record["instances"] == ["web_IN_0"], record


def test_the_cli_prints_every_step_of_a_walk_however_late_it_polls(
        make_service: MakeService) -> None:
    """UD 0 moves to v2, UD 1 fails, both go back. The CLI is stopped from the moment
    the walk starts until it is over: its next poll sees the walk over, and it still
    prints every step, in order. Before, it printed the state each instance had at
    each poll: `rolled back` twice, and neither UD 0 `ready` nor UD 1 failed."""
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2,
                                                      "backoff_initial": "5s"})
    with service.harness() as h:
        h.wait_ready(30)
        edit(service, 'probe(f"{VERSION}',
             'if RoleEnvironment.current_instance.index == 1:\n'
             '            raise RuntimeError("v2 is broken")\n        probe(f"{VERSION}')
        h.package("v2")
        cli = subprocess.Popen(
            [sys.executable, "-m", "rolehost", "deploy", "v2", "--run-dir", str(h.run_dir.path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def started() -> bool:
                try:
                    return h.client.walk()["label"] == "deploy v2"
                except ApiError:  # 404: no walk yet
                    return False

            wait_until(started, 30, "the deploy's walk to start")
            cli.send_signal(signal.SIGSTOP)
            walk = h.wait_walk(60)
            cli.send_signal(signal.SIGCONT)
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(10)
        assert walk["state"] == "rolled back", walk
        assert cli.returncode == 1, err
        assert f"walk {walk['id']} rolled back: " in err, err
        lines = out.splitlines()
        assert lines[0] == f"walk {walk['id']}: deploy v2 over 2 update domains", out
        steps = [("0", "web_IN_0", "in progress"), ("0", "web_IN_0", "ready"),
                 ("1", "web_IN_1", "in progress"), ("1", "web_IN_1", "deploy failed, instance "),
                 ("1", "web_IN_1", "rolling back"), ("1", "web_IN_1", "rolled back"),
                 ("0", "web_IN_0", "rolling back"), ("0", "web_IN_0", "rolled back")]
        assert len(lines) == 1 + len(steps) and all(
            line.startswith(f"  UD {ud}  {instance:<16} {step}")
            for line, (ud, instance, step) in zip(lines[1:], steps, strict=False)), out
        # The API's steps are what it printed, numbered.
        assert lines[1:] == [f"  UD {s['domain']}  {s['instance']:<16} {s['step']}"
                             for s in walk["steps"]], walk["steps"]
        assert [s["seq"] for s in walk["steps"]] == list(range(1, 9)), walk["steps"]
        # A follower asks only for the steps it has not shown.
        assert h.client.walk(since=6)["steps"] == walk["steps"][6:]


def test_no_rollback_leaves_the_instances_for_inspection(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2,
                                                      "backoff_initial": "30s"})
    with service.harness() as h:
        h.wait_ready(30)
        edit(service, 'probe(f"{VERSION}',
             'raise RuntimeError("v2 is broken")\n        probe(f"{VERSION}')
        h.package("v2")
        walk = h.deploy("v2", rollback=False)
        assert walk["state"] == "halted"
        assert h.instance("web/0")["state"] == "recycling"  # left on v2 for inspection
        # The step failed; the instance itself is recycling, not failed: say both.
        assert walk["progress"] == {"web_IN_0": "deploy failed, instance recycling",
                                    "web_IN_1": "pending"}, walk
        assert h.walk_abort()["state"] == "aborted"


def test_a_run_dir_in_the_app_folder_makes_no_new_version(make_service: MakeService) -> None:
    # The copy leaves the run directory (and caches, environments) out: so must the
    # version's digest, or each `rolehost package` would make a new version.
    service = make_service(ROLE)
    app = service.toml.parent / "app"
    with ServiceHarness(service.toml, run_dir=app / "rd") as h:
        h.wait_ready(30)
        first = h.package()["version"]
        (h.run_dir.path / "scratch").write_text("written by the service as it runs")
        (app / "node_modules").mkdir()
        (app / "node_modules" / "left-out.js").write_text("")
        # run-instance's run directories, beside a definition in its app folder
        (app / ".rolehost-web-0" / "logs").mkdir(parents=True)
        (app / ".rolehost-web-0" / "logs" / "web_IN_0.log").write_text("a log")
        assert h.package()["version"] == first
        edit(service, 'VERSION = "v1"', 'VERSION = "v2"')
        assert h.package()["version"] != first


@pytest.mark.slow
def test_a_rollback_takes_one_domain_at_a_time(make_service: MakeService) -> None:
    # UD 0 (web_IN_0, _2) moves to v2; in UD 1, web_IN_1 fails and web_IN_3 moves. Put
    # back all four at once, nothing is in rotation for the 2 s of on_start and a request
    # gets a 503 after its 1 s queue_timeout.
    port = free_port()
    service = make_service(
        WEB, instances=4, settings={"warmup": "2,2,2,2"},
        service={"upgrade_domains": 2, "backoff_initial": "30s"},
        role={"stop_timeout": "10s"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        queue_timeout = "1s"
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        edit(service, "delay = RoleEnvironment",
             'if me.index == 1:\n            raise RuntimeError("v2 is broken")\n'
             "        delay = RoleEnvironment")
        h.package("v2")
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=4) as load:
            load.wait_requests(100)
            walk = h.deploy("v2")
            load.wait_requests(load.requests + 100)
        assert walk["state"] == "rolled back", walk
        assert "rolled back 4 of 4" in walk["error"], walk
        assert load.failures == [], load.report()
        assert_one_domain_down_at_a_time(h, 2)
        starts = [e["instance"] for e in h.events()
                  if e["event"] == "maintenance" and e["cause"].startswith("rollback")]
        assert sorted(starts[:2]) == ["web_IN_1", "web_IN_3"], starts  # the failed UD first


def test_a_rollback_that_fails_halts_before_the_next_domain(make_service: MakeService) -> None:
    # v1 fails to start on an instance with a `broken` flag in its os/ (kept by a deploy):
    # putting web_IN_1 back fails, and web_IN_0, on v2 and serving, must stay as it is.
    service = make_service(ROLE.replace(
        "marker.touch()",
        'marker.touch()\n        if (RoleEnvironment.os_dir / "broken").exists():\n'
        '            raise RuntimeError(f"{VERSION} is broken here")'),
        instances=2, service={"upgrade_domains": 2, "backoff_initial": "30s"})
    with service.harness() as h:
        h.wait_ready(30)
        (h.run_dir.path / "instances/web_IN_1/os/broken").touch()
        edit(service, 'VERSION = "v1"', 'VERSION = "v2"')
        h.package("v2")
        walk = h.deploy("v2")
        assert walk["state"] == "halted", walk
        assert walk["progress"] == {"web_IN_0": "not rolled back",
                                    "web_IN_1": walk["progress"]["web_IN_1"]}, walk
        assert walk["progress"]["web_IN_1"].startswith("rollback failed: "), walk
        assert "rolled back 0 of 2" in walk["error"], walk
        assert "rollback halted in update domain 1" in walk["error"], walk
        web0 = h.instance("web/0")
        assert web0["state"] == "ready" and web0["restarts"] == 1, web0  # v2, untouched
        [record] = h.operations()
        assert (record["outcome"], record["error"]) == ("halted", walk["error"]), record
        assert h.walk_abort()["state"] == "aborted"
        [record] = h.operations()
        assert record["outcome"] == "failed" and "rollback halted" in record["error"]


# web_IN_1 never gets ready once the file in setting `gate` exists.
HANGS = """
class Role(RoleEntryPoint):
    def on_start(self):
        me = RoleEnvironment.current_instance.id
        while me == "web_IN_1" and os.path.exists(RoleEnvironment.get_setting("gate")):
            time.sleep(0.05)
        probe("start")
        return True
"""


def test_a_deploy_applies_every_roles_count_when_one_fails(make_service: MakeService,
                                                           tmp_path: Path) -> None:
    """The package changes the counts of two roles and the first role's new instance
    never gets ready: the second role is scaled all the same, the walk says which
    scale failed, and the definition's counts are those that run."""
    gate = tmp_path / "gate"
    service = make_service(HANGS, instances=2, settings={"gate": str(gate)},
                           service={"ready_deadline": "3s"}, role={"stop_timeout": "2s"},
                           extra=f"""
[roles.b]
entry_point = "roles:Role"
app = "app"
instances = 2

[roles.b.settings]
probe = "{tmp_path / "probe.txt"}"
gate = "{gate}"
""")
    with service.harness() as h:
        h.wait_ready(30)
        h.scale("web", 1)
        h.scale("b", 1)
        gate.touch()
        h.package("v2")  # 2 instances of each, as rolehost.toml says
        walk = h.deploy("v2")
        assert walk["state"] == "succeeded", walk
        status = h.status()
        states = {i["id"]: i["state"] for i in status["instances"]}
        assert states == {"web_IN_0": "ready", "web_IN_1": "failed", "b_IN_0": "ready",
                          "b_IN_1": "ready"}, states
        assert status["version"] == "v2"
        assert "role b: 2 instances over 2 update domains" in " ".join(status["capacity"])
        assert walk["error"].startswith("after the last domain: scale web to 2: web_IN_1 did "
                                        "not become ready after it was added"), walk
        assert "scale b" not in walk["error"], walk
        assert [(o["kind"], o["outcome"]) for o in h.operations()[-2:]] == [
            ("scale web", "failed"), ("scale b", "succeeded")]


def test_a_stop_during_a_deploys_final_scale_says_what_it_cut_short(
        make_service: MakeService, tmp_path: Path) -> None:
    """The version has switched when the package's count is applied: a stop then cuts
    short the wait for the new instance, not the deploy, and the records say so."""
    from rolehost.fabric.history import summary_without_controller

    gate = tmp_path / "gate"
    service = make_service(HANGS, instances=2, settings={"gate": str(gate)},
                           role={"stop_timeout": "2s"})
    with service.harness() as h:
        h.wait_ready(30)
        h.scale("web", 1)
        gate.touch()
        h.package("v2")  # 2 instances, as rolehost.toml says
        h.deploy("v2", wait=False)
        wait_until(lambda: any(i["id"] == "web_IN_1" and i["state"] == "starting"
                               for i in h.status()["instances"]), 30,
                   "web_IN_1 added by the deploy", lambda: str(h.status()["instances"]))
        # web_IN_0 told of its new peer: what is left of the scale is the wait for web_IN_1.
        # (Under load, a stop before that answer cut the offer short instead.)
        # (The ring holds the scale to 1's `changing` too: this one is the deploy's.)
        h.wait_event(lambda e: e.get("event") == "changing" and e.get("instance") == "web_IN_0"
                     and e.get("cause") == "deploy v2",
                     30, "web_IN_0 to answer the deploy's topology change")
        assert h.status()["version"] == "v2"
        h.stop()
        ops = summary_without_controller(h.run_dir.path / "history.jsonl")["operations"]
    deploy, scale = ops[-2:]
    assert (deploy["kind"], deploy["outcome"]) == ("deploy v2", "succeeded"), deploy
    assert deploy["error"] == "after the last domain: cut short, the controller is stopping"
    assert (scale["kind"], scale["outcome"]) == ("scale web", "failed"), scale
    assert scale["error"] == ("cut short while waiting for web_IN_1 to get ready: the "
                              "controller is stopping"), scale


def test_a_version_is_a_name_in_the_store_and_nothing_else(make_service: MakeService,
                                                           tmp_path: Path) -> None:
    """`rolehost deploy /tmp/x` deployed a package from outside the store (every
    restart failed once that folder went), and `package --version "abc\\n"` made a
    version whose name ends in a newline (the check used `$`). One check of every name
    now, to make a package or to load one, and only from the store: nothing touched."""
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        before, running = pids(h), h.status()["version"]
        outside = tmp_path / "outside"
        shutil.copytree(h.run_dir.path / "packages" / running, outside)
        (h.run_dir.path / "packages" / "linked").symlink_to(outside)
        for name in (str(outside), "../../outside", "linked"):
            deployed = rolehost("deploy", name, "-f", str(service.toml),
                                "--run-dir", str(h.run_dir.path))
            assert deployed.returncode == 2, (name, deployed.stdout, deployed.stderr)
            assert "not a version name" in deployed.stderr or "link out of" in deployed.stderr
        for name in ("abc\n", "abc\n\n", "-abc", "a" * 65):
            with pytest.raises(ApiError) as refused:
                h.package(name)
            assert refused.value.kind == "invalid", str(refused.value)
            assert "not a version name" in str(refused.value)
        assert not [p for p in (h.run_dir.path / "packages").iterdir()
                    if p.name.startswith("abc")]
        assert pids(h) == before and h.status()["version"] == running
        assert not [e for e in h.events() if e["event"] == "maintenance"]
