"""`rolehost run-instance`: one instance in the foreground, with health endpoints."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rolehost.testing import run_dir_processes, wait_until
from support.net import answer, answer_and_body, free_port
from support.processes import end_run_dir
from support.roles import HOLDS_ITS_STOP, IDLE, ON_STOP_WAITS_FOR_RELEASE, OVERRUNS_ITS_STOP
from support.service import MakeService, Service


def run_instance(service: Service, health: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rolehost", "run-instance", "web", "-f", str(service.toml),
         "--health", f"127.0.0.1:{health}", "--run-dir",
         str(service.toml.parent / "instance-run"), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def running(service: Service, health: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """run-instance until ready; on the way out, nothing of it may be left running."""
    with launched(service, health, *args) as controller:
        wait_until(lambda: answer(health, "/ready") == 200, 30, "/ready")
        yield controller


@contextlib.contextmanager
def launched(service: Service, health: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """run-instance, ready or not; on the way out, nothing of it may be left running."""
    run_dir = service.toml.parent / "instance-run"
    controller = run_instance(service, health, *args)
    try:
        yield controller
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
        left = run_dir_processes(run_dir)
        for proc in left:
            proc.kill()
    assert not left, left


@pytest.mark.parametrize("ending", ["stop", "sigterm", "stop-then-sigterm"])
def test_run_instance_lifecycle(make_service: MakeService, ending: str) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                probe(f"start index={RoleEnvironment.current_instance.index}")
                time.sleep(0.5)
                return True
            def on_stop(self):
                probe("on_stop")
        """,
        extra="""
        [[roles.web.startup_tasks]]
        command = ["true"]
        """,
    )
    port = free_port()
    run_dir = service.toml.parent / "instance-run"
    controller = subprocess.Popen(
        [sys.executable, "-m", "rolehost", "run-instance", "web", "-f", str(service.toml),
         "--health", f"127.0.0.1:{port}", "--run-dir", str(run_dir), "--drain-delay", "0.3"],
        env={**os.environ, "ROLEHOST_INDEX": "3"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: answer(port, "/live") == 200, 30, "/live")
        wait_until(lambda: answer(port, "/startup") == 200, 30, "/startup")
        assert answer(port, "/ready") == 200
        assert service.probes() == ["start index=3 web_IN_3"]
        if ending != "sigterm":
            assert answer(port, "/stop", "POST") == 200
        if ending != "stop":
            # after a preStop hook's /stop, the kubelet's SIGTERM: still one graceful stop
            controller.send_signal(signal.SIGTERM)
        assert answer(port, "/ready") in (503, 0)  # out of rotation at once
        assert controller.wait(30) == 0
        assert service.probes()[-1] == "on_stop web_IN_3"
    finally:
        if controller.poll() is None:
            controller.kill()
        end_run_dir(run_dir)


def test_the_index_comes_from_a_statefulset_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from rolehost.fabric import single

    monkeypatch.delenv("ROLEHOST_INDEX", raising=False)
    monkeypatch.setattr(single.socket, "gethostname", lambda: "shop-web-7")
    assert single.index_from_environment() == 7
    monkeypatch.setenv("ROLEHOST_INDEX", "2")
    assert single.index_from_environment() == 2


def test_settings_from_the_environment_keep_their_type_and_secrecy() -> None:
    from rolehost import definition
    from rolehost.fabric.single import settings_from_environment

    role = definition.parse({"service": {"name": "s"}, "roles": {"web": {
        "entry_point": "m:C",
        "settings": {"greeting": "hi", "workers": 2, "ratio": 0.5, "debug": False,
                     "api-key": {"value": "old", "secret": True}},
    }}}).roles["web"]
    changed = settings_from_environment(role, {
        "ROLEHOST_SETTING_GREETING": "hello", "ROLEHOST_SETTING_WORKERS": "8",
        "ROLEHOST_SETTING_RATIO": "0.25", "ROLEHOST_SETTING_DEBUG": "true",
        "ROLEHOST_SETTING_API_KEY": "new", "ROLEHOST_SETTING_UNKNOWN": "ignored"})
    assert changed.values == {"greeting": "hello", "workers": 8, "ratio": 0.25,
                              "debug": True, "api-key": "new"}
    assert changed.secrets == {"api-key"}
    shown = {"value": "x", "secret": False}  # declared not secret: it stays shown
    role = role.model_copy(update={"settings": {**role.settings,
                                                "plain": definition.Secret(**shown)}})
    changed = settings_from_environment(role, {"ROLEHOST_SETTING_PLAIN": "y",
                                               "ROLEHOST_SETTING_DEBUG": " off\n"})
    assert changed.secrets == {"api-key"} and changed.values["plain"] == "y"
    assert changed.values["debug"] is False


@pytest.mark.parametrize(("variable", "text", "expected"), [
    ("ROLEHOST_SETTING_WORKERS", "s3cr3t", "is not an integer"),
    ("ROLEHOST_SETTING_WORKERS", "2.0", "is not an integer"),
    ("ROLEHOST_SETTING_RATIO", "nan", "is not a finite number"),
    ("ROLEHOST_SETTING_DEBUG", "maybe", "is not true or false"),
    ("ROLEHOST_SETTING_PIN", "s3cr3t", "is not an integer")])
def test_a_setting_from_the_environment_of_the_wrong_type_is_refused_unseen(
        variable: str, text: str, expected: str) -> None:
    from rolehost import definition
    from rolehost.fabric.single import settings_from_environment

    role = definition.parse({"service": {"name": "s"}, "roles": {"web": {
        "entry_point": "m:C", "settings": {"workers": 2, "ratio": 0.5, "debug": False,
                                           "pin": {"value": 1234, "secret": True}},
    }}}).roles["web"]
    with pytest.raises(definition.DefinitionError) as refused:
        settings_from_environment(role, {variable: text}, "web")
    assert expected in str(refused.value) and variable in str(refused.value)
    assert text not in str(refused.value)  # perhaps a secret's: never shown


def test_run_instance_binds_the_declared_port_with_settings_from_env(
    make_service: MakeService,
) -> None:
    port, health, rpc = free_port(), free_port(), free_port()
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                me = RoleEnvironment.current_instance.endpoints["http"]
                greeting = RoleEnvironment.get_setting("greeting")
                probe(f"bind {me.host}:{me.port} greeting={greeting}")
                probe(f"data {RoleEnvironment.local_resource('data').path}")
                rpc = RoleEnvironment.current_instance.endpoints["rpc"]
                roles = {name: list(role) for name, role in RoleEnvironment.roles.items()}
                probe(f"rpc {rpc.host}:{rpc.port} roles={roles}")
                return True
        """,
        settings={"greeting": "hi"},
        extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        [roles.web.internal_endpoints.rpc]
        port = {rpc}
        [roles.web.local_resources.data]
        clean_on_recycle = false
        """,
    )
    run_dir = service.toml.parent / "instance-run"
    volume = service.toml.parent / "volume"
    controller = subprocess.Popen(
        [sys.executable, "-m", "rolehost", "run-instance", "web", "-f", str(service.toml),
         "--health", f"127.0.0.1:{health}", "--run-dir", str(run_dir),
         "--endpoint-host", "0.0.0.0", "--resources-dir", str(volume)],
        env={**os.environ, "ROLEHOST_SETTING_GREETING": "from-configmap"},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: answer(health, "/ready") == 200, 30, "/ready")
        # An internal endpoint binds its declared port, as in a pod; the instance lists
        # itself, with no controller to tell it of others.
        assert service.probes() == [f"bind 0.0.0.0:{port} greeting=from-configmap web_IN_0",
                                    f"data {volume.resolve()}/data web_IN_0",
                                    f"rpc 0.0.0.0:{rpc} roles={{'web': ['web_IN_0']}} web_IN_0"]
        assert (volume / "data").is_dir()
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0
    finally:
        if controller.poll() is None:
            controller.kill()
        for proc in run_dir_processes(run_dir):
            proc.kill()


def test_run_instance_refuses_a_setting_of_the_wrong_type_without_showing_it(
        tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    folder = Path(tmp_path)
    (folder / "role.py").write_text(
        "from rolehost import RoleEntryPoint\nclass Role(RoleEntryPoint): pass\n")
    (folder / "rolehost.toml").write_text(
        '[service]\nname = "s"\n[roles.web]\nentry_point = "role:Role"\n'
        "[roles.web.settings]\npin = { value = 1234, secret = true }\n")
    done = subprocess.run(
        [sys.executable, "-m", "rolehost", "run-instance", "web", "--health",
         f"127.0.0.1:{free_port()}"], cwd=folder, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ROLEHOST_SETTING_PIN": "s3cr3t-Value"})
    assert done.returncode == 2, done.stderr
    assert "rolehost.toml: roles.web.settings.pin: ROLEHOST_SETTING_PIN is not an integer" \
        in done.stderr
    assert "s3cr3t" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    assert not run_dir_processes(folder / ".rolehost-web-0")


def test_run_instance_refuses_a_bad_health_address_or_index_cleanly(
        tmp_path: os.PathLike[str]) -> None:
    """Nothing listens on every interface unless asked (a bare port did, /stop included);
    a taken port, a bad index: a message and an exit code, never a traceback."""
    import socket
    from pathlib import Path

    folder = Path(tmp_path)
    (folder / "role.py").write_text(
        "from rolehost import RoleEntryPoint\nclass Role(RoleEntryPoint): pass\n")
    (folder / "rolehost.toml").write_text(
        '[service]\nname = "s"\n[roles.web]\nentry_point = "role:Role"\n')

    def run_instance(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rolehost", "run-instance", "web", *args],
                              cwd=folder, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for done, code, expected in (
                (run_instance("--health", "18493"), 2, "expected HOST:PORT, with a host"),
                (run_instance("--health", "localhost:abc"), 2, "expected HOST:PORT"),
                (run_instance("--index", "-1"), 2, "-1 is not in the range x>=0"),
                (run_instance(ROLEHOST_INDEX="abc"), 2,
                 "ROLEHOST_INDEX='abc': expected an index"),
                (run_instance("--health", f"127.0.0.1:{port}"), 1,
                 f"cannot listen on 127.0.0.1:{port} for the health endpoints")):
            assert done.returncode == code, done.stderr
            assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not run_dir_processes(folder / ".rolehost-web-0")


def test_ready_says_draining_then_stopping(make_service: MakeService) -> None:
    """/ready answered "not ready: ready" through the drain delay: the reason is the stop."""
    service = make_service(ON_STOP_WAITS_FOR_RELEASE)
    health = free_port()
    with running(service, health, "--drain-delay", "3") as controller:
        controller.send_signal(signal.SIGTERM)
        assert answer_and_body(health, "/ready") == (
            503, '{"error": "not ready: draining (received SIGTERM)", '
            '"kind": "unavailable"}')
        service.wait_probe("on_stop web_IN_0")
        assert answer_and_body(health, "/ready") == (
            503, '{"error": "not ready: stopping (received SIGTERM)", '
            '"kind": "unavailable"}')
        (service.toml.parent / "release").touch()
        assert controller.wait(30) == 0


@pytest.mark.parametrize("overrun", ["host-bounds-it", "host-frozen"])
def test_a_stop_cut_short_by_stop_timeout_exits_3(make_service: MakeService,
                                                  overrun: str) -> None:
    """The instance stopped, but on_stop did not finish: the orchestrator must see it.
    The host cuts on_stop short itself; a frozen host is killed by the supervisor."""
    service = make_service(OVERRUNS_ITS_STOP, role={"stop_timeout": "1s"},
                           settings={"overrun": overrun})
    with running(service, free_port()) as controller:
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 3
        assert service.probes()[-1] == "on_stop web_IN_0"


@pytest.mark.parametrize("during", ["drain", "on_stop", "foreground-task"])
def test_a_second_signal_cuts_the_stop_short(make_service: MakeService, during: str) -> None:
    """A second SIGTERM (or Ctrl-C) was ignored: the stop ran its whole course, up to
    the drain delay plus stop_timeout. Now it ends at once, and leaves nothing behind."""
    service = make_service(HOLDS_ITS_STOP, settings={"during": during}, role={"stop_timeout": "5m"},
        extra="""
        [[roles.web.startup_tasks]]
        command = ["sleep", "300"]
        type = "foreground"
        """ if during == "foreground-task" else "")
    health = free_port()
    drain = "300" if during == "drain" else "0"
    with running(service, health, "--drain-delay", drain) as controller:
        controller.send_signal(signal.SIGTERM)
        if during == "drain":
            wait_until(lambda: answer(health, "/ready") == 503, 10, "/ready 503")
        else:
            service.wait_probe("on_stop web_IN_0")
        controller.send_signal(signal.SIGINT if during == "on_stop" else signal.SIGTERM)
        assert controller.wait(15) == 3
        assert service.count("on_stop") == (0 if during == "drain" else 1)


def test_a_signal_after_a_fast_stop_does_not_decide_the_exit(make_service: MakeService) -> None:
    """SIGTERM during a startup task stops at once; a second signal while the process
    exits found the default action back and killed it (143, 130). Signals are sent
    every few milliseconds until it has exited: each lands before the stop ended (a
    forced stop, exit 3) or after (nothing left to stop, exit 0)."""
    service = make_service(IDLE, extra="""
        [[roles.web.startup_tasks]]
        command = ["sleep", "300"]
        """)
    health = free_port()
    run_dir = service.toml.parent / "instance-run"
    with launched(service, health) as controller:
        wait_until(lambda: answer(health, "/live") == 200, 30, "/live")
        wait_until(lambda: any("sleep" in p.cmdline() for p in run_dir_processes(run_dir)),
                   30, "the startup task")
        controller.send_signal(signal.SIGTERM)
        for n in range(5000):  # a deadline: 5000 times at most 2 ms
            if controller.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                controller.send_signal(signal.SIGINT if n % 2 else signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                controller.wait(0.002)
        assert controller.wait(10) in (0, 3)


def test_ready_fails_while_the_host_is_silent(make_service: MakeService) -> None:
    """A frozen host (SIGSTOP) answers nothing: /ready says so at its first missed
    heartbeat, with no balancer in front, and 200 again once it is heard."""
    service = make_service("""
        class Role(RoleEntryPoint):
            def on_start(self):
                probe(f"pid:{os.getpid()}")
                return True
        """, service={"heartbeat_interval": "300ms"})
    health = free_port()
    with running(service, health) as controller:
        (line,) = [p for p in service.probes() if p.startswith("pid:")]
        host = int(line.split()[0].removeprefix("pid:"))
        os.kill(host, signal.SIGSTOP)
        try:
            wait_until(lambda: answer(health, "/ready") == 503, 10, "/ready 503")
            status, body = answer_and_body(health, "/ready")
            assert status == 503 and "silent: no heartbeat for" in body, body
        finally:
            os.kill(host, signal.SIGCONT)
        wait_until(lambda: answer(health, "/ready") == 200, 10, "/ready 200 again")
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0


def test_the_definition_is_not_copied_into_app(tmp_path: Path) -> None:
    """The default app folder, ".", holds the definition: its secrets reach the role as
    settings, never as a file in its app/, with no package in between either."""
    (tmp_path / "roles.py").write_text(textwrap.dedent("""
        import os
        from rolehost import RoleEntryPoint, RoleEnvironment

        class Role(RoleEntryPoint):
            def on_start(self):
                with open(RoleEnvironment.get_setting("seen"), "w") as out:
                    out.write(" ".join(sorted(os.listdir("."))))
                return True
        """))
    (tmp_path / "rolehost.toml").write_text(textwrap.dedent(f"""
        [service]
        name = "s"
        [roles.web]
        entry_point = "roles:Role"
        [roles.web.settings]
        seen = "{tmp_path / 'seen'}"
        password = {{ value = "hunter2", secret = true }}
        """))
    service = Service(tmp_path / "rolehost.toml", tmp_path / "probe.txt")
    with running(service, free_port()) as controller:
        assert (tmp_path / "seen").read_text() == "roles.py"
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0
