"""Scaling a role while the service runs: what the new instances are, and what they see."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rolehost.client import ApiError
from rolehost.testing import ServiceHarness, wait_until
from support.cli import rolehost
from support.net import free_port, get
from support.roles import WATCHES_TOPOLOGY, WEB
from support.service import MakeService

# Each start says whether the local resource still holds what an earlier instance wrote.
DISKS = """
class Role(RoleEntryPoint):
    def on_start(self):
        kept = RoleEnvironment.local_resource("cache").path / "kept"
        probe(f"start kept={kept.exists()}")
        kept.write_text("x")
        return True
"""

# An image task: it runs again only on a new image (its marker lives in os/).
TASK = """
[roles.web.local_resources.cache]
size_mb = 10
clean_on_recycle = false

[[roles.web.startup_tasks]]
command = "echo $ROLEHOST_INSTANCE_ID >> {tasks}"
shell = true
once_per = "image"
"""


def test_an_instance_scaled_out_again_is_a_new_vm(make_service: MakeService,
                                                   tmp_path: Path) -> None:
    """On the platform a scale-in deletes the VM and a scale-out creates a new one: the
    index that comes back has none of the old instance's disks or task markers."""
    tasks = tmp_path / "tasks.txt"
    service = make_service(DISKS, instances=3, extra=TASK.format(tasks=tasks))
    with service.harness(run_dir=tmp_path / "run") as h:
        h.wait_ready(30)
        folder = h.run_dir.path / "instances" / "web_IN_2"
        assert folder.is_dir()
        h.scale("web", 2)
        assert not folder.exists()
        h.scale("web", 3)
        h.wait_ready(30)
        service.wait_probe("start kept=False web_IN_2")
        assert service.probes().count("start kept=False web_IN_2") == 2
        assert "start kept=True web_IN_2" not in service.probes()
        assert tasks.read_text().split().count("web_IN_2") == 2
    # A controller stopped with 3 instances and started with 2 leaves web_IN_2's folders
    # behind: a scale-out does not take them over.
    service.toml.write_text(service.toml.read_text().replace("instances = 3", "instances = 2"))
    with service.harness(run_dir=h.run_dir.path) as again:
        again.wait_ready(30)
        assert folder.is_dir()
        again.scale("web", 3)
        again.wait_ready(30)
        wait_until(lambda: service.probes().count("start kept=False web_IN_2") == 3, 30,
                   "a third fresh start of web_IN_2", lambda: "\n".join(service.probes()))
        assert tasks.read_text().split().count("web_IN_2") == 3
        assert "start kept=True web_IN_0" in service.probes()  # a controller start keeps them


def test_every_instance_of_a_scale_out_by_several_sees_all_of_them(
    make_service: MakeService,
) -> None:
    """The new instances see each other, the ones added after them too, as the ones
    that were there are told."""
    service = make_service(WATCHES_TOPOLOGY, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        h.scale("web", 5)
        h.wait_ready(30)
        every = ",".join(f"web_IN_{i}" for i in range(5))
        for i in (0, 1):
            service.wait_probe(f"changing web web_IN_{i}")
            service.wait_probe(f"changed roles={every} web_IN_{i}")
        starts = [line for line in service.probes() if line.startswith("start")]
        assert sorted(starts[2:]) == [f"start roles={every} web_IN_{i}" for i in (2, 3, 4)]
        # Their boots say why they started: the scale, not the deployment's start.
        boots = {e["instance"]: e["cause"] for e in h.events() if e["event"] == "boot"}
        assert boots["web_IN_0"] == "deployment started"
        scaled = "scaled out: requested through the API"
        assert [boots[f"web_IN_{i}"] for i in (2, 3, 4)] == [scaled] * 3, boots


# Not ready until the file in setting `gate` exists; with `gate` "never", never.
GATED = """
class Role(RoleEntryPoint):
    def on_start(self):
        gate = RoleEnvironment.get_setting("gate")
        while not os.path.exists(gate):
            time.sleep(0.05)
        return True
"""


def test_a_scale_out_is_recorded_once_its_instances_are_ready(make_service: MakeService,
                                                               tmp_path: Path) -> None:
    """As an operation on an instance is: `rolehost scale` answers then, and a new
    instance that misses its ready deadline fails the scale."""
    gate = tmp_path / "gate"
    service = make_service(GATED, settings={"gate": str(gate)},
                           service={"ready_deadline": "4s"})
    gate.touch()
    with service.harness() as h:
        h.wait_ready(30)
        gate.unlink()
        answer: list[object] = []
        scaling = threading.Thread(target=lambda: answer.append(h.scale("web", 2)))
        scaling.start()
        wait_until(lambda: [i["state"] for i in h.status()["instances"]][1:] == ["starting"],
                   30, "web_IN_1 in on_start", lambda: str(h.status()["instances"]))
        [record] = h.operations()
        assert (record["kind"], record["outcome"]) == ("scale web", "running")
        assert answer == []
        gate.touch()
        scaling.join(30)
        assert answer == [["web_IN_1"]]
        assert h.instance("web/1")["state"] == "ready"
        [record] = h.operations()
        assert (record["outcome"], record["instances"]) == ("succeeded", ["web_IN_1"])
        # One that never gets ready fails the scale once its ready deadline is missed.
        gate.unlink()
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "scale", "web", "3",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert done.stderr.startswith(
            "rolehost: web_IN_2 did not become ready after it was added: it is failed "
            "(waiting for host: not ready within the ready deadline (4s)"), done.stderr
        assert h.instance("web/2")["state"] == "failed"
        record = h.operations()[-1]
        assert (record["kind"], record["outcome"]) == ("scale web", "failed")
        assert record["error"].startswith("web_IN_2 did not become ready after it was added")


def test_rolehost_scale_says_which_instances_it_added_and_which_it_removed(
    make_service: MakeService,
) -> None:
    service = make_service(WATCHES_TOPOLOGY)
    with service.harness() as h:
        h.wait_ready(30)
        where = ("--run-dir", str(h.run_dir.path))
        done = rolehost("scale", "web", "3", *where)
        assert (done.returncode, done.stdout) == (0, "web: 3 instances, added web_IN_1, "
                                                     "web_IN_2\n"), done.stderr
        done = rolehost("scale", "web", "1", *where)
        assert (done.returncode, done.stdout) == (0, "web: 1 instance, removed web_IN_1, "
                                                     "web_IN_2\n"), done.stderr
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0"]


def test_what_a_scale_did_in_words() -> None:
    from rolehost.control.wording import scaled

    assert scaled("web", 12, ["web_IN_10", "web_IN_11"]) == (
        "web: 12 instances, added web_IN_10, web_IN_11")
    assert scaled("web", 2, ["web_IN_2", "web_IN_10"]) == (
        "web: 2 instances, removed web_IN_2, web_IN_10")
    assert scaled("web", 1, []) == "web: 1 instance, unchanged"


def test_a_scale_to_the_count_that_runs_changes_nothing(make_service: MakeService) -> None:
    """No instance is told of a topology change that did not happen (a handler that
    cancels would recycle its instance for nothing)."""
    service = make_service(WATCHES_TOPOLOGY, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
        assert h.scale("web", 2) == []
        [record] = h.operations()
        assert (record["kind"], record["outcome"], record["instances"]) == (
            "scale web", "succeeded", [])
        assert not any(line.startswith("chang") for line in service.probes())
        assert {i["id"]: i["pid"] for i in h.status()["instances"]} == pids


def _edits(h: ServiceHarness) -> list[tuple[str, str]]:
    return [(r["kind"], r["outcome"]) for r in h.operations()
            if r["arguments"].get("cause") == "definition edited"]


def test_saving_the_file_back_takes_a_failed_edit_back(make_service: MakeService,
                                                       tmp_path: Path) -> None:
    """An edit whose scale-out never got ready leaves the count the file asked for to do:
    saving the file as it was scales back and puts the setting back."""
    gate = tmp_path / "gate"
    gate.touch()
    service = make_service(GATED, settings={"gate": str(gate)},
                           service={"ready_deadline": "3s"})
    original = service.toml.read_text()
    with service.harness() as h:
        h.wait_ready(30)
        service.toml.write_text(original.replace("instances = 1", "instances = 2")
                                .replace(str(gate), str(tmp_path / "never")))
        wait_until(lambda: _edits(h) == [("config web", "succeeded"), ("scale web", "failed")],
                   60, "the edit, its scale failed", lambda: str(h.operations()))
        service.toml.write_text(original)
        wait_until(lambda: _edits(h)[2:] == [("config web", "succeeded"),
                                             ("scale web", "succeeded")],
                   60, "the file saved back applied", lambda: str(h.operations()))
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0"]
        assert h.operations()[-2]["arguments"]["settings"]["gate"] == str(gate)


def test_an_edit_saved_while_another_applies_is_applied_after_it(
        make_service: MakeService, tmp_path: Path) -> None:
    """Each edit is compared with the file as the one before left it: one saved while
    the last one's scale waits for its new instance is not lost."""
    gate = tmp_path / "gate"
    service = make_service(GATED, settings={"gate": str(gate)})
    gate.touch()
    original = service.toml.read_text()
    with service.harness() as h:
        h.wait_ready(30)
        gate.unlink()
        service.toml.write_text(original.replace("instances = 1", "instances = 2"))
        wait_until(lambda: [i["state"] for i in h.status()["instances"]][1:] == ["starting"],
                   30, "web_IN_1 in on_start", lambda: str(h.status()["instances"]))
        service.toml.write_text(original)  # saved back while the scale-out waits
        gate.touch()
        wait_until(lambda: _edits(h) == [("scale web", "succeeded"), ("scale web", "succeeded")],
                   60, "both edits applied", lambda: str(h.operations()))
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0"]


# Runs the controller with the start held up where the control API already answers and
# the instances are not added yet (the metrics listener is opened there), so that a
# scale surely lands in that window.
SLOW_START = """
import asyncio, sys
from rolehost.control import api

serve_metrics = api.serve_metrics

async def held_up(*args, **kwargs):
    await asyncio.sleep(1.5)
    return await serve_metrics(*args, **kwargs)

api.serve_metrics = held_up
sys.argv = ["rolehost", *sys.argv[3:]]  # as `python -m rolehost ...` would have them
from rolehost.cli import main
main()
"""

STARTS = """
class Role(RoleEntryPoint):
    def on_start(self):
        probe(f"start pid={os.getpid()}")
        return True
"""


def _slow_start(tmp_path: Path) -> Path:
    """An interpreter that runs the controller through SLOW_START, which holds the
    start back after the control API answers."""
    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_START)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return python


def test_wait_ready_waits_for_the_start_not_for_an_empty_list(
    make_service: MakeService, tmp_path: Path,
) -> None:
    """Before the start has added the instances, the status lists none: `wait_ready`
    took that for every instance back, and returned before the balancer listened."""
    port = free_port()
    service = make_service(WEB, instances=2, settings={"warmup": "0,0"},
                           service={"metrics": f"127.0.0.1:{free_port()}"},
                           extra=f"[roles.web.endpoints.http]\nport = {port}\n")
    with service.harness(python=_slow_start(tmp_path)) as h:  # returns once the API answers
        assert h.status()["instances"] == []  # still held up
        status = h.wait_ready(30)
        assert [i["id"] for i in status["instances"]] == ["web_IN_0", "web_IN_1"]
        assert get(port)[0] == 200  # the balancer listens, and sends to an instance


def test_a_scale_during_the_controllers_start_starts_each_instance_once(
    make_service: MakeService, tmp_path: Path,
) -> None:
    """The control API answers before the controller has added and started its
    instances: a scale then must neither add instances under the ids the start adds
    again nor start any of them a second time."""
    port = free_port()
    service = make_service(STARTS, instances=2, service={"metrics": f"127.0.0.1:{port}"})
    with service.harness(python=_slow_start(tmp_path)) as h:  # returns once the API answers
        assert h.status()["instances"] == []  # still held up: the scale lands in the window
        assert h.scale("web", 3) == ["web_IN_2"]
        h.wait_ready(30)
        instances = h.status()["instances"]
        assert [i["id"] for i in instances] == ["web_IN_0", "web_IN_1", "web_IN_2"]
        # One host each, and the standby host kept warm for the next boot.
        hosts = [p.pid for p in h.processes() if "rolehost.host" in p.cmdline()]
        assert {i["pid"] for i in instances} <= set(hosts)
        assert len(hosts) <= len(instances) + 1, hosts
        starts = sorted(line.split()[-1] for line in service.probes())
        assert starts == ["web_IN_0", "web_IN_1", "web_IN_2"], service.probes()


def test_no_scale_while_the_controller_stops(make_service: MakeService) -> None:
    """A scale-in during the stop took an instance out of it: its on_stop overrun went
    unreported (exit 0 for 3) and its disks were deleted. Once stopping, the controller
    answers every operation 503, and an edit of the file is not applied."""
    service = make_service("""
        class Role(RoleEntryPoint):
            def on_stop(self):
                probe("on_stop")
                time.sleep(60)
        """, instances=2, role={"stop_timeout": "2s"})
    with service.harness() as h:
        h.wait_ready(30)
        h.signal_controller(signal.SIGTERM)
        wait_until(lambda: service.count("on_stop") == 2, 30, "both in on_stop")
        with pytest.raises(ApiError, match="the controller is stopping") as refused:
            h.scale("web", 1)
        assert (refused.value.status, refused.value.kind) == (503, "unavailable")
        assert h.wait_controller_exit(30) == 3
        assert "web_IN_1: " in h.run_dir.console_log.read_text()
        assert (h.run_dir.instances / "web_IN_1").is_dir()
