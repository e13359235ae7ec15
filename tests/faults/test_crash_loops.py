"""Faults 9 and 19: a role that dies at once, every time, or cannot even be imported."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import psutil
import pytest

from rolehost.client import ApiError
from rolehost.testing import ServiceHarness, wait_until
from support.faults import Bystander, role, state_events, timed_status
from support.roles import IDLE
from support.service import MakeService

LOOP = {"backoff_initial": "100ms", "backoff_max": "800ms", "stable_after": "60s"}
# Instance 0 never gets ready: its on_start raises every time.
NEVER_READY = role("""
    class Role(RoleEntryPoint):
        def on_start(self):
            if faulty():
                raise RuntimeError("schema missing")
            return True
    """)


def delays(h: ServiceHarness, instance_id: str = "web_IN_0") -> list[float]:
    """The back-off of each recycle of the instance, from the reasons of its events."""
    found = []
    for event in state_events(h, instance_id, "recycling"):
        match = re.search(r"next try in ([\d.]+)s", str(event["reason"]))
        assert match, event
        found.append(float(match[1]))
    return found


def boots(h: ServiceHarness, instance_id: str = "web_IN_0") -> int:
    return sum(1 for e in h.events() if e["event"] == "boot" and e["instance"] == instance_id)


@pytest.mark.slow
def test_crash_loop_backs_off_to_the_cap_and_the_controller_idles(
    make_service: MakeService,
) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                if faulty():
                    probe("on_start")
                    os._exit(3)
                return True
        """), instances=2, service=LOOP)
    with service.harness() as h:
        bystander = Bystander(h)
        wait_until(lambda: len(delays(h)) >= 5, 10, "five recycles")
        assert delays(h)[:5] == [0.1, 0.2, 0.4, 0.8, 0.8]  # doubling, capped
        row = h.instance("web/0")
        assert row["last_error"] == "host exited with 3" and row["attempt"] >= 5
        # Now in the steady loop at the cap: watch the controller for 4 seconds.
        assert h.controller is not None
        controller = psutil.Process(h.controller.pid)
        cpu_before, began, starts_before = controller.cpu_times(), time.monotonic(), boots(h)
        latencies = []
        while time.monotonic() - began < 4:  # the passing of time is what is measured
            latencies.append(timed_status(h))
            time.sleep(0.05)
        cpu_after, wall = controller.cpu_times(), time.monotonic() - began
        used = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        cpu = 100 * used / wall
        starts = boots(h) - starts_before
        print(f"crash loop: {starts} boots in {wall:.1f}s, controller CPU {cpu:.1f}%, status "
              f"median {statistics.median(latencies) * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms")
        assert 3 <= starts <= 7, f"{starts} boots in {wall:.1f}s at a 0.8s back-off"
        assert cpu < 10, f"the controller used {cpu:.1f}% of a core in a crash loop"
        assert statistics.median(latencies) < 0.1 and max(latencies) < 0.5, (
            f"status calls: median {statistics.median(latencies) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms")
        assert all(d == 0.8 for d in delays(h)[4:])
        bystander.check()


def break_module(path: Path, text: str) -> str:
    good = path.read_text()
    path.write_text(good + "\n" + text + "\n")
    return good


def assert_no_spin(h: ServiceHarness, seconds: float = 3.0) -> None:
    """At a 0.8 s cap, a few seconds hold a handful of boots, never a tight loop."""
    wait_until(lambda: len(delays(h)) >= 4, 10, "the back-off to reach the cap")
    before = boots(h)
    time.sleep(seconds)  # the passing of time is what is measured: boots in it
    count = boots(h) - before
    assert count <= seconds / 0.8 + 2, f"{count} boots in {seconds:g}s"


@pytest.mark.slow
def test_syntax_error_at_runtime(make_service: MakeService) -> None:
    service = make_service(role(IDLE), instances=2, service=LOOP)
    with service.harness() as h:
        bystander = Bystander(h)
        # The preflight of `rolehost start` refuses a module that does not import, so the
        # module breaks after the start: in the package the controller runs (it snapshots
        # the app folder when it starts), which a restart deploys.
        (source,) = h.run_dir.path.glob("packages/*/apps/web/roles.py")
        good = break_module(source, "def broken(:\n    pass")
        h.restart("web/0", wait=False)
        row = h.wait_state("web/0", "recycling", 10)
        assert row["last_error"].startswith("import: SyntaxError: "), row["last_error"]
        log = h.logs("web/0")
        assert "Traceback (most recent call last)" in log and "def broken(:" in log
        exits = [e for e in h.events() if e["event"] == "host_exited"
                 and e["instance"] == "web_IN_0"]
        assert exits[-1]["outcome"] == "exited with 76 (boot_failed)"
        assert_no_spin(h)
        source.write_text(good)  # fixed: a restart deploys it, and the instance is back
        assert h.restart("web/0")[0]["state"] == "ready"
        bystander.check()


@pytest.mark.slow
def test_import_error_at_runtime(make_service: MakeService) -> None:
    service = make_service(role(IDLE), instances=2, service=LOOP)
    with service.harness() as h:
        bystander = Bystander(h)
        # The instance's own copy breaks (a recycle keeps app/), then its host dies.
        copy = Path(h.instance("web/0")["dirs"]["app"]) / "roles.py"
        break_module(copy, "import module_that_is_not_there")
        h.kill("web/0")
        row = wait_until(lambda: (r := h.instance("web/0"))["last_error"] != (
            "host killed by SIGKILL") and r["state"] == "recycling" and r, 10,
            "a failed import")
        assert row["last_error"] == (
            "import: ModuleNotFoundError: No module named 'module_that_is_not_there'")
        assert "Traceback (most recent call last)" in h.logs("web/0")
        assert_no_spin(h)
        bystander.check()


def test_a_crash_loop_that_never_gets_ready_fails_at_its_ready_deadline(
        make_service: MakeService) -> None:
    """The boots since an instance was last ready share one ready deadline: a loop that
    never gets there is `failed` ("waiting for host") once it is spent, and waits for
    someone to act. An operation gives it a fresh deadline."""
    service = make_service(NEVER_READY, instances=2, service={**LOOP, "ready_deadline": "2s"})
    with service.harness() as h:
        bystander = Bystander(h)
        row = h.wait_state("web/0", "failed", 15)
        assert re.fullmatch(
            r"waiting for host: not ready within the ready deadline \(2s\) in \d+ boots; "
            r"it was \w+; last error: on_start: RuntimeError: schema missing", row["reason"])
        assert boots(h) >= 3  # it did recycle, with back-off, until the deadline was spent
        failed_boots = boots(h)
        with pytest.raises(ApiError, match="did not become ready after restart"):
            h.restart("web/0")  # someone acts: a fresh deadline, and another loop
        assert boots(h) > failed_boots
        h.wait_state("web/0", "failed", 15)  # in its own time again
        bystander.check()


def test_a_loop_of_false_starts_names_its_reason_when_it_fails(make_service: MakeService) -> None:
    """on_start returning False sets no error: the failed reason names the recycle's."""
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                return not faulty()
        """), instances=2, service={**LOOP, "ready_deadline": "3s"})
    # The deadline spans several boots of the loop: at 1 s, a loaded runner spent it all
    # on the first boot's host start, before any on_start had returned False to name.
    with service.harness() as h:
        row = h.wait_state("web/0", "failed", 30)
        assert row["reason"].endswith("; last error: on_start returned False"), row["reason"]


def test_an_operation_on_a_crash_looping_instance_starts_its_back_off_afresh(
        make_service: MakeService) -> None:
    """Someone acted: the next failure waits backoff_initial, not the grown delay."""
    service = make_service(NEVER_READY, instances=2, service=LOOP)
    with service.harness() as h:
        wait_until(lambda: delays(h)[-1:] == [0.8], 15, "the back-off at its cap")
        seen = len(delays(h))
        with pytest.raises(ApiError, match="did not become ready after restart"):
            h.restart("web/0")
        wait_until(lambda: len(delays(h)) > seen, 10, "the next recycle")
        assert delays(h)[seen] == 0.1, delays(h)
