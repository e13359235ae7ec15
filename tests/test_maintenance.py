"""Startup tasks, local disks and the maintenance events: the disk table of concepts.md."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rolehost.client import ApiError
from rolehost.testing import ServiceHarness, wait_until
from support.roles import IDLE
from support.service import MakeService, Service

# Each task appends "task:ONCE_PER INSTANCE" to the probe file.
TASK = (
    "import os; open(os.environ['ROLEHOST_SETTING_PROBE'], 'a').write("
    "'task:{name} ' + os.environ['ROLEHOST_INSTANCE_ID'] + chr(10))"
)
DISK_ROLE = """
from pathlib import Path

class Role(RoleEntryPoint):
    def on_start(self):
        env = RoleEnvironment
        files = {
            "keep": env.local_resource("keep").path / "k.txt",
            "scratch": env.local_resource("scratch").path / "s.txt",
            "os": env.os_dir / "o.txt",
            "app": env.app_dir / "a.txt",
        }
        seen = sorted(name for name, path in files.items() if path.exists())
        probe("seen:" + ",".join(seen))
        for path in files.values():
            path.write_text("x")
        return True
"""
DISKS = """
[roles.web.local_resources.keep]
clean_on_recycle = false
[roles.web.local_resources.scratch]
clean_on_recycle = true
""" + "".join(
    f"""
[[roles.web.startup_tasks]]
command = ["python", "-c", "{TASK.format(name=once)}"]
once_per = "{once}"
"""
    for once in ("start", "image", "disk")
)


def _since(service: Service, mark: int) -> list[str]:
    return [line.split()[0] for line in service.probes()[mark:]]


@pytest.mark.parametrize(
    ("event", "survivors", "tasks"),
    [
        ("recycle", "app,keep,os", ["task:start"]),
        ("restart", "keep,os", ["task:start"]),
        ("reimage", "keep", ["task:start", "task:image"]),
        ("rebuild", "", ["task:start", "task:image", "task:disk"]),
        ("agent-update", "app,keep,os,scratch", []),
    ],
)
def test_disk_table(
    make_service: MakeService, event: str, survivors: str, tasks: list[str]
) -> None:
    service = make_service(DISK_ROLE, instances=2, extra=DISKS)
    with service.harness() as h:
        h.wait_ready(30)
        assert sorted(_since(service, 0)) == sorted(
            ["task:start", "task:image", "task:disk", "seen:"] * 2)
        other = h.instance("web/1")["pid"]
        mark = len(service.probes())
        [row] = h.maintain(event, "web/0")
        assert row["state"] == "ready"
        assert _since(service, mark) == [*tasks, f"seen:{survivors}"]
        assert h.instance("web/1")["pid"] == other  # the other instance is untouched
        ran = {t["once_per"]: t["state"] for t in h.instance("web/0")["tasks"]}
        if event != "agent-update":
            assert ran == {"start": "succeeded",
                           "image": "succeeded" if "task:image" in tasks else "skipped",
                           "disk": "succeeded" if "task:disk" in tasks else "skipped"}
        kinds = [e for e in h.events() if e["event"] == "maintenance"]
        assert [(e["instance"], e["kind"]) for e in kinds] == [("web_IN_0", event)]


def test_crash_recycle_keeps_os_and_reruns_only_start_tasks(make_service: MakeService) -> None:
    service = make_service(DISK_ROLE, extra=DISKS, service={"backoff_initial": "100ms"})
    with service.harness() as h:
        h.wait_ready(30)
        mark = len(service.probes())
        h.wait_replaced("web/0", h.kill("web/0"), 30)
        assert _since(service, mark) == ["task:start", "seen:app,keep,os"]


def test_failing_simple_task_blocks_the_instance(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                probe("on_start")
                return True
        """,
        service={"backoff_initial": "200ms", "backoff_max": "400ms"},
        extra="""
        [[roles.web.startup_tasks]]
        command = "sh -c 'echo configuring; echo duplicate entry >&2; exit 3'"
        [[roles.web.startup_tasks]]
        command = "touch never-run"
        """,
    )
    with service.harness() as h:
        row = h.wait_state("web/0", "recycling", 30)
        assert row["last_error"] == (
            "startup task 1 (sh -c 'echo configuring; echo duplicate entry >&2; exit 3') "
            "exited with 3: duplicate entry"
        )
        first, second = row["tasks"]
        assert first["state"] == "failed" and first["exit_code"] == 3
        assert first["tail"] == ["configuring", "duplicate entry"]
        assert second["state"] == "pending"
        wait_until(lambda: h.instance("web/0")["restarts"] >= 2, 30, "a retry with back-off")
        assert service.count("on_start") == 0  # the host never started
        assert "Z task 1 | duplicate entry\n" in h.logs("web/0")


def test_hanging_task_misses_the_ready_deadline(make_service: MakeService) -> None:
    service = make_service(
        IDLE,
        service={"ready_deadline": "1s"},
        extra="""
        [[roles.web.startup_tasks]]
        command = ["sleep", "600"]
        """,
    )
    with service.harness() as h:
        row = h.wait_state("web/0", "failed", 30)
        assert "ready deadline (1s)" in row["last_error"]
        assert "running task 1 (sleep 600)" in row["last_error"]
        wait_until(lambda: len(h.processes()) == 2, 10, "the task to be gone")  # + standby


def test_an_agent_update_mid_task_runs_the_tasks_again(make_service: MakeService) -> None:
    """An agent update restarts only the host of a boot whose tasks are done. One that
    cuts a boot short in its tasks starts the boot over: the host never starts before a
    simple task has succeeded."""
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                done = os.path.exists(RoleEnvironment.get_setting("probe") + ".done")
                probe(f"start done={done}")
                return True
        """,
        service={"backoff_initial": "0.1s"},
        extra="""
        [[roles.web.startup_tasks]]
        shell = true
        command = '''
        rm -f "$ROLEHOST_SETTING_PROBE.done"
        while [ -e "$ROLEHOST_SETTING_PROBE.hold" ]; do sleep 0.05; done
        touch "$ROLEHOST_SETTING_PROBE.done"'''
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        hold = Path(f"{service.probe}.hold")
        hold.touch()
        h.kill("web/0")
        wait_until(lambda: h.instance("web/0")["tasks"][0]["state"] == "running", 30,
                   "the recycle's task to run")
        h.agent_update("web/0", wait=False)
        h.wait_event(lambda e: e["event"] == "boot" and e["kind"] == "agent-update", 30)
        wait_until(lambda: h.instance("web/0")["tasks"][0]["state"] == "running", 30,
                   "the task to run again")
        assert h.instance("web/0")["state"] == "bootstrapping"
        hold.unlink()
        h.wait_ready(30)
        assert [p.split()[1] for p in service.probes()] == ["done=True", "done=True"]


def test_task_timeout(make_service: MakeService) -> None:
    service = make_service(
        IDLE,
        extra="""
        [[roles.web.startup_tasks]]
        command = ["sleep", "600"]
        timeout = "300ms"
        """,
    )
    with service.harness() as h:
        row = h.wait_state("web/0", "recycling", 30)
        assert "startup task 1 (sleep 600) timed out after 0.3s" in row["last_error"]


def test_task_environment_and_folder(make_service: MakeService) -> None:
    script = (
        "import os, sys; e = os.environ; "
        "open(e['ROLEHOST_SETTING_PROBE'], 'a').write(' '.join(["
        "'env', e['ROLEHOST_ROLE'], e['ROLEHOST_INSTANCE_ID'], e['GREETING'], "
        "str(os.getcwd() == e['ROLEHOST_APP_DIR']), "
        "str(e['TMPDIR'].startswith(e['ROLEHOST_OS_DIR'])), "
        "str(os.path.isdir(e['ROLEHOST_RESOURCE_CACHE'])), e['ROLEHOST_SETTING_COLOR']]) + chr(10))"
    )
    service = make_service(
        IDLE,
        settings={"color": "blue"},
        extra=f"""
        [roles.web.local_resources.cache]
        [[roles.web.startup_tasks]]
        command = ["python", "-c", "{script}"]
        env = {{ GREETING = "hi" }}
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        assert "env web web_IN_0 hi True True True blue" in service.probe.read_text()


def test_background_task_failure_is_logged_and_the_instance_runs(
    make_service: MakeService,
) -> None:
    service = make_service(
        IDLE,
        extra="""
        [[roles.web.startup_tasks]]
        command = "sh -c 'sleep 0.2; echo gave up; exit 7'"
        type = "background"
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        event = h.wait_event(lambda e: e["event"] == "task_failed", 10, "the task to fail")
        assert event["type"] == "background" and event["reason"] == "exited with 7"
        assert h.instance("web/0")["state"] == "ready"


def test_a_background_task_ended_with_its_boot_is_stopped_not_failed(
    make_service: MakeService,
) -> None:
    """A restart ends the boot and its background task: not an error to report."""
    service = make_service(
        IDLE,
        extra="""
        [[roles.web.startup_tasks]]
        command = "sleep 300"
        type = "background"
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        h.restart("web/0")
        stopped = h.wait_event(lambda e: e["event"] == "task_stopped", 10, "the task to stop")
        assert stopped["reason"] == "ended with its boot (killed by SIGKILL)"
        assert not [e for e in h.events() if e["event"] == "task_failed"]


def test_foreground_task_holds_the_stop_until_it_exits(make_service: MakeService) -> None:
    service = make_service(
        IDLE,
        role={"stop_timeout": "30s"},
        extra="""
        [[roles.web.startup_tasks]]
        command = ["sh", "-c", "trap '' TERM; while [ ! -e release ]; do sleep 0.05; done"]
        type = "foreground"
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        app = h.instance("web/0")["dirs"]["app"]
        h.signal_controller(signal.SIGTERM)
        h.wait_event(lambda e: e["event"] == "waiting_for_foreground_tasks", 10)
        time.sleep(0.5)  # the stop must still be held: the task has not exited
        assert h.controller is not None and h.controller.poll() is None
        open(f"{app}/release", "w").close()
        assert h.wait_controller_exit(10) == 0


def test_foreground_task_is_killed_after_stop_timeout(make_service: MakeService) -> None:
    service = make_service(
        IDLE,
        role={"stop_timeout": "1s"},
        extra="""
        [[roles.web.startup_tasks]]
        command = ["sh", "-c", "trap '' TERM; sleep 600"]
        type = "foreground"
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        began = time.monotonic()
        h.stop(timeout=30)
        assert time.monotonic() - began < 6
        assert '"foreground_task_killed"' in (h.run_dir.logs / "controller.log").read_text()


def test_resource_usage_in_status(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                (RoleEnvironment.local_resource("cache").path / "blob").write_bytes(b"x" * 2**21)
                return True
        """,
        extra="""
        [roles.web.local_resources.cache]
        size_mb = 1
        clean_on_recycle = false
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        h.recycle("web/0")  # measured at every boot
        h.wait_event(lambda e: e["event"] == "resource_over_size", 10)
        cache = h.instance("web/0")["resources"]["cache"]
        assert cache["used_mb"] == 2.0 and cache["over"] is True


def test_operations_reject_unknown_and_concurrent(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_stop(self):
                time.sleep(1)
        """,
        instances=2,
    )
    with service.harness() as h:
        h.wait_ready(30)
        pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
        with pytest.raises(ApiError) as unknown:
            h.restart("web/0", "web/9")
        assert (unknown.value.status, unknown.value.kind) == (404, "not-found")
        assert "no instance 'web/9'" in str(unknown.value)
        assert {i["id"]: i["pid"] for i in h.status()["instances"]} == pids  # nothing touched
        h.restart("web/0", wait=False)
        with pytest.raises(ApiError) as busy:
            h.reimage("web/0", "web/1")
        assert (busy.value.status, busy.value.kind) == (409, "conflict")
        assert "web_IN_0" in str(busy.value)
        assert h.instance("web/1")["pid"] == pids["web_IN_1"]
        cli = subprocess.run(
            [sys.executable, "-m", "rolehost", "rebuild", "web/7",
             "--run-dir", str(h.run_dir.path)],
            capture_output=True, text=True, timeout=30,
        )
        assert cli.returncode == 2 and "no instance 'web/7'" in cli.stderr
        h.wait_replaced("web/0", pids["web_IN_0"], 30)


def test_wait_reports_an_instance_that_does_not_come_back(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                marker = RoleEnvironment.os_dir / "installed"
                if not marker.exists() and os.path.exists(RoleEnvironment.get_setting("probe")):
                    raise RuntimeError("tool missing from os/")
                marker.touch()
                probe("started")
                return True
        """,
        service={"backoff_initial": "30s", "backoff_max": "30s"},
    )
    with service.harness() as h:
        h.wait_ready(30)
        cli = subprocess.run(
            [sys.executable, "-m", "rolehost", "reimage", "web/0", "--wait",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60,
        )
        assert cli.returncode == 1
        assert "web_IN_0 did not become ready after reimage: it is recycling" in cli.stderr
        assert "tool missing from os/" in cli.stderr


def test_wait_names_why_now_not_an_older_crash(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                return not (RoleEnvironment.os_dir / "refuse").exists()
        """,
        service={"backoff_initial": "1s", "backoff_max": "1s"},
    )
    with service.harness() as h:
        h.wait_ready(30)
        first = h.instance("web/0")["pid"]
        h.kill("web/0")  # last_error: the kill
        h.wait_replaced("web/0", first, 60)
        (h.run_dir.path / "instances/web_IN_0/os/refuse").touch()
        with pytest.raises(ApiError) as refused:
            h.maintain("restart", "web/0")
        assert (refused.value.status, refused.value.kind) == (500, "failed")
        assert "on_start returned False" in str(refused.value)
        assert "SIGKILL" not in str(refused.value)


def test_harness_in_a_user_test(make_service: MakeService) -> None:
    """ServiceHarness as a user meets it: restart under a test, then prove it is clean."""
    service = make_service(IDLE)
    with ServiceHarness(service.toml) as h:
        h.wait_ready(30)
        before = h.instance("web/0")["pid"]
        [row] = h.restart("web/0")
        assert row["state"] == "ready" and row["pid"] != before


def test_two_operations_sent_at_once_on_one_instance_one_is_refused(
        make_service: MakeService) -> None:
    """One operation at a time holds for requests that reach the controller together:
    the instance is taken before the answer, not by a task scheduled after it. Before,
    both got 200, and the second failed later in the history, unseen."""
    service = make_service(IDLE, service={"stable_after": "1s"})
    body = b'{"instances": ["web/0"]}'
    request = (b"POST /v1/operations/restart HTTP/1.1\r\nHost: x\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
               % (len(body), body))
    with service.harness() as h:

        def settled() -> bool:
            row = h.instance("web/0")
            return row["state"] == "ready" and row["operation"] is None

        for _ in range(3):
            wait_until(settled, 30, "web/0 ready, with no operation under way")
            sockets = []
            for _ in range(2):
                sockets.append(socket.socket(socket.AF_UNIX))
                sockets[-1].settimeout(10)
                sockets[-1].connect(str(h.run_dir.socket))
            for s in sockets:  # both in before the controller reads either
                s.sendall(request)
            answers = []
            for s in sockets:
                with s:
                    received = b""
                    while chunk := s.recv(65536):
                        received += chunk
                answers.append(received.split(b" ", 2)[1])
            assert sorted(answers) == [b"200", b"409"], answers
        wait_until(settled, 30, "web/0 ready, with no operation under way")
        assert [r["outcome"] for r in h.operations()] == ["succeeded"] * 3
