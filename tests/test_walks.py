"""Update-domain walks: one UD at a time, halts, manual mode, history, no failed request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from rolehost.client import ApiError
from rolehost.testing import LoadProbe, ServiceHarness, wait_until
from support.domains import assert_one_domain_down_at_a_time
from support.net import free_port
from support.roles import IDLE, WEB
from support.service import MakeService

# on_start reports what survived in os/, then marks it; with a `stuck` flag file in the
# instance's os/, on_start hangs (a role that cannot come back after the update).
ROLE = """
class Role(RoleEntryPoint):
    def on_start(self):
        marker = RoleEnvironment.os_dir / "marker"
        probe(f"start os_kept={marker.exists()}")
        marker.touch()
        if (RoleEnvironment.os_dir / "stuck").exists():
            time.sleep(600)
        return True
"""


@pytest.mark.parametrize("domains", [2, 3])
@pytest.mark.parametrize(("kind", "os_kept"), [
    ("host-os", True), ("guest-os", False), ("agent", None),
])
def test_walk_takes_one_domain_at_a_time(
    make_service: MakeService, kind: str, domains: int, os_kept: bool | None
) -> None:
    service = make_service(ROLE, instances=4, service={"upgrade_domains": domains})
    with service.harness() as h:
        h.wait_ready(30)
        walk = h.upgrade(kind)
        assert walk["state"] == "succeeded"
        assert walk["domains"] == [[f"web_IN_{i}" for i in range(4) if i % domains == ud]
                                   for ud in range(domains)]
        assert_one_domain_down_at_a_time(h, domains)
        assert all(i["restarts"] == 1 for i in h.status()["instances"])
        starts = [p for p in service.probes() if p.startswith("start")]
        if os_kept is None:  # an agent update restarts the host only: on_start, not tasks
            assert len(starts) == 8
        else:
            assert starts[4:].count(f"start os_kept={os_kept} web_IN_0") == 1
        [record] = h.operations()
        assert (record["kind"], record["outcome"]) == (f"upgrade {kind}", "succeeded")


def test_manual_walk_pauses_after_each_domain(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        first = h.status()["instances"][1]["pid"]
        walk = h.upgrade("host-os", manual=True)
        assert (walk["state"], walk["domain"]) == ("paused", 0)
        assert h.instance("web/1")["pid"] == first  # UD 1 untouched while paused
        with pytest.raises(Exception, match="one operation at a time"):
            h.upgrade("agent")
        assert h.walk_next()["state"] == "succeeded"
        assert h.instance("web/1")["pid"] != first


def test_manual_walk_does_not_pause_after_an_empty_domain(make_service: MakeService) -> None:
    # 2 instances over 4 domains: UD 2 and UD 3 hold none. Pausing after UD 1 or UD 2
    # would ask for `walk next` with nothing walked since, or nothing left to walk.
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 4})
    with service.harness() as h:
        h.wait_ready(30)
        walk = h.upgrade("agent", manual=True)
        assert (walk["state"], walk["domain"]) == ("paused", 0), walk
        walk = h.walk_next()
        assert (walk["state"], walk["domain"]) == ("succeeded", 1), walk
        assert walk["progress"] == {"web_IN_0": "ready", "web_IN_1": "ready"}
        [record] = h.operations()
        assert record["outcome"] == "succeeded"


# on_start waits while a `hold` file is in os/; a changing handler cancels, so a settings
# change recycles (and waits there too).
HELD = """
class Role(RoleEntryPoint):
    def on_start(self):
        RoleEnvironment.on_changing(lambda event: event.cancel())
        probe("start")
        while (RoleEnvironment.os_dir / "hold").exists():
            time.sleep(0.05)
        return True
"""


def refused(h: ServiceHarness, why: str) -> None:
    """Every other kind of operation is refused with 409 while one is under way."""
    for attempt in (lambda: h.maintain("reimage", "web/1"), lambda: h.upgrade("agent"),
                    lambda: h.set_setting("web", "color", "red"), lambda: h.scale("web", 3)):
        with pytest.raises(ApiError, match=why) as raised:
            attempt()
        assert (raised.value.status, raised.value.kind) == (409, "conflict")


def test_one_operation_at_a_time(make_service: MakeService) -> None:
    """A walk, a settings change, a scale and an operation on an instance exclude each
    other: two at once could take down a second update domain before the first came back
    (an instance's own operation excludes only the service-wide ones)."""
    service = make_service(HELD, instances=2, service={"upgrade_domains": 2},
                           settings={"color": "blue"})
    with service.harness() as h:
        h.wait_ready(30)
        hold = h.run_dir.path / "instances/web_IN_0/os/hold"

        h.upgrade("host-os", manual=True)  # paused after UD 0
        refused(h, "is paused: one operation at a time")
        assert h.walk_next()["state"] == "succeeded"
        with pytest.raises(ApiError, match="is succeeded, not paused") as over:
            h.walk_next()
        assert (over.value.status, over.value.kind) == (409, "conflict")

        hold.touch()
        h.maintain("restart", "web/0", wait=False)
        wait_until(lambda: service.count("start") == 5, 30, "web_IN_0 to hold in on_start")
        for attempt in (lambda: h.upgrade("agent"), lambda: h.scale("web", 3),
                        lambda: h.set_setting("web", "color", "red")):
            with pytest.raises(ApiError, match="under way on web_IN_0"):
                attempt()
        hold.unlink()
        h.wait_ready(30)

        hold.touch()
        changing = threading.Thread(target=h.set_setting, args=("web", "color", "green"))
        changing.start()  # per update domain: web_IN_0 recycles and holds
        wait_until(lambda: service.count("start") == 6, 30, "web_IN_0 to hold after a change")
        refused(h, "config web is under way")
        hold.unlink()
        changing.join(60)
        assert not changing.is_alive()
        assert [i["state"] for i in h.status()["instances"]] == ["ready", "ready"]
        assert [(r["kind"], r["outcome"]) for r in h.operations()] == [
            ("upgrade host-os", "succeeded"), ("restart", "succeeded"),
            ("config web", "succeeded")]


def ops(h: ServiceHarness, *args: str) -> str:
    """What `rolehost ops` prints for the harness's run directory."""
    done = subprocess.run([sys.executable, "-m", "rolehost", "ops", *args, "--run-dir",
                           str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_walk_halts_when_a_domain_does_not_come_back(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2,
                                                      "ready_deadline": "2s"})
    with service.harness() as h:
        h.wait_ready(30)
        h.restart("web/1")  # one operation that succeeded, for the success rate
        untouched = h.instance("web/1")["pid"]
        (h.run_dir.path / "instances/web_IN_0/os/stuck").touch()
        walk = h.upgrade("host-os")  # host-os keeps os/: the flag stays and on_start hangs
        assert walk["state"] == "halted"
        assert "halted in update domain 0" in walk["error"] and "web_IN_0" in walk["error"]
        assert "failed" in walk["error"]
        assert h.instance("web/1")["pid"] == untouched  # never a second domain down
        # The missed ready deadline left the instance failed ("waiting for host").
        assert walk["progress"] == {"web_IN_0": "restart failed, instance failed",
                                    "web_IN_1": "pending"}, walk
        # Halted, not running: it failed already, and the success rate counts it so.
        record = h.operations()[-1]
        assert (record["kind"], record["outcome"]) == ("upgrade host-os", "halted"), record
        assert record["error"] == walk["error"] and record["ended"] is None, record
        assert h.client.operations()["success_rate"] == 0.5
        listed = ops(h)
        assert f"{walk['id']}  " in listed and " halted " in listed, listed
        assert "success rate: 50%" in listed, listed
        assert json.loads(ops(h, "--json"))["operations"][-1]["outcome"] == "halted"
        assert h.walk_abort()["state"] == "aborted"
        record = h.operations()[-1]
        assert record["outcome"] == "failed" and "ready deadline" in record["error"]
        assert h.client.operations()["success_rate"] == 0.5


def halt_a_walk(h: ServiceHarness) -> dict[str, Any]:
    """Halt a host-os walk in UD 0 (with a ready deadline of seconds), then lift what
    halted it, so that the next boot of web_IN_0 gets ready."""
    stuck = h.run_dir.path / "instances/web_IN_0/os/stuck"
    stuck.touch()
    walk = h.upgrade("host-os")
    assert walk["state"] == "halted", walk
    stuck.unlink()
    return walk


def test_a_halted_walk_whose_controller_is_killed_ends_failed(
        make_service: MakeService) -> None:
    """The halt's line survives in the file, and the next controller ends the walk as
    an `abort` would have: failed, with why it halted."""
    from rolehost.fabric.history import summary_without_controller

    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2,
                                                      "ready_deadline": "2s"})
    with service.harness() as h:
        h.wait_ready(30)
        walk = halt_a_walk(h)
        h.signal_controller(signal.SIGKILL)
        h.wait_controller_exit(10)
        wait_until(lambda: not h.processes(), 10, "the instances to follow the controller")
        path = h.run_dir.path / "history.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[-1]["id"] == walk["id"] and lines[-1]["outcome"] == "halted", lines
        expected = f"{walk['error']}; the controller stopped while the walk was halted"
        [offline] = summary_without_controller(path)["operations"]
        assert (offline["outcome"], offline["error"]) == ("failed", expected), offline
        with ServiceHarness(service.toml, run_dir=h.run_dir.path) as second:
            second.wait_ready(30)
            [record] = second.operations()
            assert (record["outcome"], record["error"]) == ("failed", expected), record
            assert record["ended"] is not None
            assert second.client.operations()["success_rate"] == 0.0


def test_a_halted_walk_stopped_with_its_controller_ends_failed(
        make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2,
                                                      "ready_deadline": "2s"})
    with service.harness() as h:
        h.wait_ready(30)
        walk = halt_a_walk(h)
        h.signal_controller(signal.SIGTERM)
        assert h.wait_controller_exit(30) == 0
        last = json.loads((h.run_dir.path / "history.jsonl").read_text().splitlines()[-1])
        assert (last["id"], last["outcome"]) == (walk["id"], "failed"), last
        assert last["error"] == (f"{walk['error']}; the controller stopped while the walk "
                                 "was halted"), last


def test_history_survives_the_controller(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    first = service.harness()
    with first as h:
        h.wait_ready(30)
        h.restart("web/0")
        h.upgrade("host-os", manual=True)  # left paused: interrupted by the next kill
        h.signal_controller(signal.SIGKILL)
        h.wait_controller_exit(10)
        wait_until(lambda: not h.processes(), 10, "the instances to follow the controller")
        second = ServiceHarness(service.toml, run_dir=h.run_dir.path)
        with second:
            second.wait_ready(30)
            history = second.operations()
            assert [(o["kind"], o["outcome"]) for o in history] == [
                ("restart", "succeeded"), ("upgrade host-os", "interrupted")]
            assert "the controller stopped" in history[1]["error"]
            # Paused after UD 0 when killed: UD 1 never had the restart.
            assert history[1]["instances"] == ["web_IN_0"], history[1]


def test_sigterm_during_a_walk_stops_cleanly(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        h.upgrade("host-os", manual=True)
        h.signal_controller(signal.SIGTERM)
        assert h.wait_controller_exit(30) == 0
        lines = (h.run_dir.path / "history.jsonl").read_text().splitlines()
        assert '"outcome": "aborted"' in lines[-1] and "controller is stopping" in lines[-1]


def test_sigterm_while_a_walk_waits_on_an_instance_stops_cleanly(
        make_service: MakeService) -> None:
    # The walk is cancelled while it awaits the instance's operation; the instance then
    # settles (stopped) with that operation still its own.
    service = make_service(ROLE, instances=2, service={"upgrade_domains": 2},
                           role={"stop_timeout": "2s"})
    with service.harness() as h:
        h.wait_ready(30)
        (h.run_dir.path / "instances/web_IN_0/os/stuck").touch()  # on_start will hang
        h.upgrade("host-os", wait=False)
        service.wait_probe("start os_kept=True web_IN_0")  # the walk waits on it now
        h.signal_controller(signal.SIGTERM)
        code = h.wait_controller_exit(30)
        console = h.run_dir.console_log.read_text()
        # 3, not 1: a clean stop, but the hung on_start was cut short at stop_timeout.
        assert code == 3, console
        assert "web_IN_0: on_stop: on_start did not return within stop_timeout" in console
        assert "supervisor_crashed" not in console and "InvalidStateError" not in console
        lines = (h.run_dir.path / "history.jsonl").read_text().splitlines()
        assert '"outcome": "aborted"' in lines[-1] and "controller is stopping" in lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["host-os", "guest-os", "agent", "deploy"])
def test_no_request_fails_during_a_walk(make_service: MakeService, kind: str) -> None:
    port = free_port()
    service = make_service(
        WEB, instances=4, settings={"warmup": "0,0,0,0"}, service={"upgrade_domains": 2},
        role={"stop_timeout": "10s"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=6) as load:
            load.wait_requests(200)
            steady = load.percentile(99)
            began = time.monotonic()
            if kind == "deploy":
                h.package("v2")
                assert h.deploy("v2")["state"] == "succeeded"
            else:
                assert h.upgrade(kind)["state"] == "succeeded"
            walk_seconds = time.monotonic() - began
            load.wait_requests(load.requests + 200)
        assert load.failures == [], load.report()
        print(f"{kind}: {load.report()} steady p99 {steady * 1000:.1f} ms, "
              f"walk {walk_seconds:.1f}s")


def test_a_walk_does_not_start_with_an_instance_down_outside_its_first_domain(
        make_service: MakeService) -> None:
    """UD 1 is down already (a crash loop): walking UD 0 would take both down. Before,
    the walk started, restarted UD 0 and then halted in UD 1."""
    service = make_service("""
        class Role(RoleEntryPoint):
            def on_start(self):
                if (RoleEnvironment.os_dir / "broken").exists():
                    raise RuntimeError("broken")
                return True
        """, instances=2, service={"upgrade_domains": 2, "backoff_initial": "100ms"})
    with service.harness() as h:
        h.wait_ready(30)
        ready = h.instance("web/0")["pid"]
        (h.run_dir.path / "instances/web_IN_1/os/broken").touch()
        h.kill("web/1")
        h.wait_state("web/1", "recycling", 10)
        with pytest.raises(ApiError, match=r"web_IN_1 is recycling .*a walk would take a "
                                           r"second update domain down") as refused:
            h.upgrade("host-os")
        assert (refused.value.status, refused.value.kind) == (409, "conflict")
        assert h.instance("web/0")["pid"] == ready  # untouched
        assert not h.operations()


def test_a_walk_header_counts_the_domains_it_walks(make_service: MakeService) -> None:
    """2 instances over 5 update domains: UDs 2 to 4 are empty, and not walked."""
    service = make_service(IDLE, instances=2, service={"upgrade_domains": 5})
    with service.harness() as h:
        h.wait_ready(30)
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "upgrade", "agent", "--detach",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        walk = h.wait_walk(60)
        assert done.stdout == f"walk {walk['id']}: upgrade agent over 2 update domains\n"
        assert walk["state"] == "succeeded", walk


def test_walk_next_prints_the_steps_after_the_pause_only(make_service: MakeService) -> None:
    """`upgrade --manual` prints UD 0's steps, `walk next` UD 1's: each step once, and
    no `pending` line, which is where an instance is before any step."""
    service = make_service(IDLE, instances=2, service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)

        def rolehost(*args: str) -> list[str]:
            done = subprocess.run([sys.executable, "-m", "rolehost", *args, "--run-dir",
                                   str(h.run_dir.path)], capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout.splitlines()

        paused = rolehost("upgrade", "agent", "--manual")
        walk = h.client.walk()
        assert paused == [
            f"walk {walk['id']}: upgrade agent over 2 update domains",
            "  UD 0  web_IN_0         in progress",
            "  UD 0  web_IN_0         ready",
            f"walk {walk['id']}: paused after update domain 0; `rolehost walk next` to go on",
        ], paused
        done = rolehost("walk", "next")
        assert done[:2] == ["  UD 1  web_IN_1         in progress",
                            "  UD 1  web_IN_1         ready"], done
        assert len(done) == 3 and done[2].startswith(
            f"walk {walk['id']}: every update domain done in "), done


def test_the_walk_header_in_words() -> None:
    from rolehost.control.wording import walk_header

    assert walk_header({"id": "w", "domains": [["a_IN_0"], [], []]}, "deploy v2") == (
        "walk w: deploy v2 over 1 update domain")
    assert walk_header({"id": "w", "domains": [["a_IN_0"], ["a_IN_1"]]}, "upgrade agent") == (
        "walk w: upgrade agent over 2 update domains")
