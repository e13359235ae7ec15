"""The command line and the control API, as a user meets them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from rolehost.client import ApiError, Client
from rolehost.testing import ServiceHarness, run_dir_processes, wait_until
from support.cli import rolehost
from support.net import free_port
from support.roles import IDLE
from support.service import MakeService

GOOD = """
[service]
name = "shop"

[roles.web]
entry_point = "app:Web"
instances = 1

[roles.web.endpoints.http]
port = 18080
"""
APP = "from rolehost import RoleEntryPoint\nclass Web(RoleEntryPoint): pass\nclass NotARole: pass\n"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("instances = 1", "instance = 1"),
         "rolehost.toml: roles.web.instance: unknown key; did you mean 'instances'?"),
        (lambda t: t.replace("instances = 1", 'instances = "two"'),
         "rolehost.toml: roles.web.instances: expected an integer, got 'two'"),
        (lambda t: t.replace("instances = 1", "instances = true"),
         "rolehost.toml: roles.web.instances: expected an integer, got True"),
        (lambda t: t.replace("instances = 1", "instances = 2.0"),
         "rolehost.toml: roles.web.instances: expected an integer, got 2.0"),
        (lambda t: t.replace("port = 18080", "port = 18080.0"),
         "rolehost.toml: roles.web.endpoints.http.port: expected an integer, got 18080.0"),
        (lambda t: t.replace('name = "shop"', 'name = "shop"\nready_deadline = "soon"'),
         "rolehost.toml: service.ready_deadline: expected a duration"),
        (lambda t: t.replace("app:Web", "missing_module:Web"),
         "rolehost.toml: roles.web.entry_point: cannot load missing_module:Web"),
        (lambda t: t.replace("app:Web", "app:NotARole"),
         "app:NotARole is not a subclass of rolehost.RoleEntryPoint"),
        (lambda t: t + '\n[roles.api]\nentry_point = "app:Web"\n'
                       '[roles.api.endpoints.http]\nport = 18080\n',
         "rolehost.toml: roles.api.endpoints.http.port: port 18080 is already used by "
         "roles.web.endpoints.http.port"),
        (lambda t: t + '\n[roles.api]\nentry_point = "app:Web"\n'
                       '[roles.api.endpoints.http]\nport = 18080\nhost = "localhost"\n',
         "rolehost.toml: roles.api.endpoints.http.port: port 18080 is already used by "
         "roles.web.endpoints.http.port"),
        (lambda t: t + '\n[roles.web.settings]\ndb-host = "a"\ndb_host = "b"\n',
         "rolehost.toml: roles.web.settings.db_host: expected a name of its own: 'db-host' is "
         "passed as ROLEHOST_SETTING_DB_HOST too"),
        (lambda t: t + "\n[[roles.web.startup_tasks]]\ncommand = \"echo 'unterminated\"\n",
         "rolehost.toml: roles.web.startup_tasks[0].command: expected a command that splits"),
        (lambda t: t.replace("[service]", "[service"), "rolehost.toml: invalid TOML"),
        (lambda t: t.replace("app:Web", "site:Web"),  # app.py is copied as site.py too
         "has no attribute 'Web'; a module of that name was imported before the one in"),
        (lambda t: t.replace("instances = 1", "instances = 3")
         + '[roles.web.instance_endpoints.debug]\npublic_ports = "10100-10101"\n',
         "rolehost.toml: roles.web.instance_endpoints.debug.public_ports: expected a port for "
         "each of the 3 instances, got 2 (10100-10101)"),
        (lambda t: t + '[roles.web.instance_endpoints.debug]\npublic_ports = "10109-10100"\n',
         "rolehost.toml: roles.web.instance_endpoints.debug.public_ports: expected a range "
         "from a lower port to a higher one, got '10109-10100'"),
        (lambda t: t + '[roles.web.internal_endpoints.http]\n',
         "rolehost.toml: roles.web.internal_endpoints.http: expected a name no other "
         "endpoint of the role has: endpoints.http has it"),
        (lambda t: t.replace("port = 18080", 'port = 18080\nprotocol = "https"'),
         "rolehost.toml: roles.web.endpoints.http.certificate: expected a certificate file: "
         "protocol is https"),
    ],
    ids=["unknown-key", "wrong-type", "bool-for-int", "float-for-int", "float-for-port",
         "bad-duration", "missing-module",
         "not-a-role", "duplicate-port", "duplicate-port-other-spelling", "same-variable",
         "unsplittable-task", "bad-toml", "shadowed-module", "instance-ports-short",
         "instance-ports-reversed", "endpoint-name-twice", "https-without-certificate"],
)
@pytest.mark.parametrize("command", ["start", "check"])
def test_bad_definition_exits_2_and_starts_nothing(
    tmp_path: Path, edit: object, expected: str, command: str
) -> None:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "site.py").write_text(APP)  # the standard library's `site` comes first
    (tmp_path / "rolehost.toml").write_text(edit(GOOD))  # type: ignore[operator]
    done = rolehost(command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert not (tmp_path / ".rolehost" / "control.sock").exists()
    assert not run_dir_processes(tmp_path / ".rolehost")


def test_check_accepts_a_good_definition(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "rolehost.toml").write_text(GOOD)
    done = rolehost("check", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rolehost.toml: valid; rehearsing web" in done.stdout
    assert "rehearsal: every step passed" in done.stdout


def test_stop_says_when_the_stop_was_cut_short(make_service: MakeService,
                                               tmp_path: Path) -> None:
    """`rolehost stop` said "stopped" and exited 0 though on_stop had been killed half
    done: a detached controller's exit code reaches no one, so the stop reports it."""
    service = make_service("""
        class Role(RoleEntryPoint):
            def on_stop(self):
                time.sleep(60)
        """, role={"stop_timeout": "1s"})
    with ServiceHarness(service.toml, run_dir=tmp_path / "rd") as h:
        h.wait_ready(30)
        stopped = rolehost("stop", "-f", str(service.toml), "--run-dir", str(tmp_path / "rd"))
        assert stopped.returncode == 3, stopped.stderr
        assert stopped.stdout == "stopped\n"
        assert stopped.stderr.startswith(
            "rolehost: the stop was cut short; cleanup may be incomplete:\n"
            "  web_IN_0: on_stop: stopping handlers and on_stop did "
            "not finish within stop_timeout (1s)"), stopped.stderr
        assert h.wait_controller_exit(10) == 3


def test_the_stop_cut_short_exit_code_is_run_instances() -> None:
    from rolehost.cli import service
    from rolehost.fabric import single

    assert service.EXIT_STOP_CUT_SHORT == single.EXIT_STOP_CUT_SHORT == 3


def test_missing_definition_file(tmp_path: Path) -> None:
    done = rolehost("start", "-f", str(tmp_path / "nope.toml"))
    assert done.returncode == 2 and "nope.toml: file not found" in done.stderr


def test_detach_status_logs_stop(tmp_path: Path) -> None:
    """The whole user journey: start --detach, status, logs, stop."""
    (tmp_path / "app.py").write_text(
        "from rolehost import RoleEntryPoint\n"
        "class Web(RoleEntryPoint):\n"
        "    def on_start(self):\n        print('warming up', flush=True)\n        return True\n"
    )
    (tmp_path / "rolehost.toml").write_text(GOOD.replace("instances = 1", "instances = 2"))
    run_dir = tmp_path / ".rolehost"
    started = rolehost("start", "--detach", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        assert "started shop" in started.stdout

        def all_ready() -> bool:
            out = rolehost("status", "--json", cwd=tmp_path)
            instances = json.loads(out.stdout)["instances"]  # none before the start adds them
            return bool(instances) and all(i["state"] == "ready" for i in instances)

        wait_until(all_ready, 30, "both instances ready")
        table = rolehost("status", cwd=tmp_path).stdout
        assert "web_IN_0" in table and "web_IN_1" in table and "ready" in table
        logs = rolehost("logs", "web/1", cwd=tmp_path)
        assert logs.returncode == 0 and "warming up" in logs.stdout
        events = rolehost("logs", cwd=tmp_path).stdout
        assert "web_IN_1: starting -> ready" in events
        again = rolehost("start", cwd=tmp_path)
        assert again.returncode == 1 and "already running" in again.stderr
        stopped = rolehost("stop", cwd=tmp_path)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert not run_dir_processes(run_dir)
        gone = rolehost("status", cwd=tmp_path)
        assert gone.returncode == 1 and "no controller is running" in gone.stderr
    finally:
        for proc in run_dir_processes(run_dir):
            proc.kill()


@pytest.mark.parametrize("form", ["text", "json"])
def test_logs_follow_prints_new_lines(make_service: MakeService, form: str) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def run(self):
                n = 0
                while not RoleEnvironment.wait_for_stop(0.1):
                    n += 1
                    print(f"tick {n}", flush=True)
        """,
        service={"instance_log_format": form},
    )
    with service.harness() as h:
        h.wait_ready(30)
        follower = subprocess.Popen(
            [sys.executable, "-m", "rolehost", "logs", "web/0", "-f", "-n", "0",
             "--run-dir", str(h.run_dir.path)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert follower.stdout is not None
            # Either form of the file is followed as text: TIME STREAM | LINE.
            line = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z stdout \| tick (\d+)\n")
            first = line.fullmatch(follower.stdout.readline())
            second = line.fullmatch(follower.stdout.readline())
            assert first and second
            assert int(second[1]) == int(first[1]) + 1
        finally:
            follower.kill()
            follower.wait(10)


def test_run_dir_and_socket_are_private(make_service: MakeService) -> None:
    service = make_service(IDLE)
    with contextlib.ExitStack() as stack:
        old_umask = os.umask(0)  # the loosest umask must not loosen them
        try:
            # As a context manager, so that its exit removes the run directory it made.
            harness = stack.enter_context(service.harness())
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE(harness.run_dir.path.stat().st_mode) == 0o700
        assert stat.S_IMODE(harness.run_dir.socket.stat().st_mode) == 0o600
        controller = psutil.Process(harness.status()["pid"])
        listening = [c for c in controller.net_connections("inet") if c.status == "LISTEN"]
        assert listening == []  # no TCP control listener, on any interface


def test_api_errors_are_json_and_the_controller_keeps_serving(make_service: MakeService) -> None:
    service = make_service(IDLE)
    with service.harness() as h:
        h.wait_ready(30)
        client = h.client
        with pytest.raises(ApiError) as unknown:
            client.instance("web/7")
        assert (unknown.value.status, unknown.value.kind) == (404, "not-found")
        assert "instances: web_IN_0" in unknown.value.message == str(unknown.value)
        with pytest.raises(ApiError) as bad_name:
            client.instance("web")
        assert (bad_name.value.status, bad_name.value.kind) == (400, "invalid")
        with pytest.raises(ApiError) as wrong_method:
            client.request("POST", "/v1/status")
        assert (wrong_method.value.status, wrong_method.value.kind) == (405, "not-allowed")
        with pytest.raises(ApiError) as huge:
            client.request("POST", "/v1/shutdown", body={"x": "y" * (2 * 1024 * 1024)})
        assert (huge.value.status, huge.value.kind) == (413, "too-large")
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(h.run_dir.socket))
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = raw.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400") and b'"kind": "invalid"' in answer, answer
        raw.close()
        assert h.status()["instances"][0]["state"] == "ready"


def _documented_fields(table_after: str) -> set[str]:
    """The fields named in the first column of the table that follows `table_after` in
    docs/api.md."""
    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    rows = page.split(table_after, 1)[1].split("\n\n", 2)[1].splitlines()[2:]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}


def test_the_status_fields_are_the_ones_docs_api_describes(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(IDLE, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        """)
    with service.harness() as h:
        h.wait_ready(30)
        status = h.status()
        assert set(status) == _documented_fields("The service:")
        assert set(status["instances"][0]) == _documented_fields("Each instance:")
        assert set(status["balancers"][0]) == {"role", "endpoint", "slot", "protocol",
                                               "address", "in_rotation", "connections",
                                               "max_connections"}


def test_pipelined_requests_are_answered_each_in_its_turn(make_service: MakeService) -> None:
    """Requests that reach the API in one read (the end of a body over the limit and the
    next request, say) are each answered, in order, as themselves: a 413 that says
    keep-alive leaves the connection usable, and an error closes it only in its turn."""
    service = make_service(IDLE)
    with service.harness() as h:
        h.wait_ready(30)
        body = b"x" * (1024 * 1024 + 1)
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(10)
        raw.connect(str(h.run_dir.socket))
        raw.sendall(b"POST /v1/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    b"GET /v1/walk HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"NOT HTTP AT ALL\r\n\r\n" % (len(body), body))
        answers = b""
        while data := raw.recv(65536):  # to the close that follows the 400
            answers += data
        raw.close()
        statuses = re.findall(rb"HTTP/1.1 (\d+) ", answers)
        assert statuses == [b"413", b"404", b"404", b"400"], answers
        assert answers.count(b"Connection: keep-alive") == 3
        assert answers.count(b"Connection: close") == 1
        assert b"no walk has run" in answers and b"no such endpoint: /v1/nope" in answers
        assert h.status()["instances"][0]["state"] == "ready"  # no shutdown, either


def test_an_upgrade_request_is_refused_once_and_not_run(make_service: MakeService) -> None:
    """An Upgrade (or CONNECT) request gets one answer, a 400 that closes: it is not run
    first (a shutdown, say) and answered twice, which left a pipelining client reading
    one request's answer as the next one's."""
    service = make_service(IDLE)
    with service.harness() as h:
        h.wait_ready(30)
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(10)
        raw.connect(str(h.run_dir.socket))
        raw.sendall(b"GET /v1/walk HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"POST /v1/shutdown HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nContent-Length: 0\r\n\r\n"
                    b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = b""
        while data := raw.recv(65536):  # to the close that follows the 400
            answers += data
        raw.close()
        assert re.findall(rb"HTTP/1.1 (\d+) ", answers) == [b"404", b"400"], answers
        assert b"upgrade is not supported here" in answers
        assert h.status()["instances"][0]["state"] == "ready"  # no shutdown


@pytest.mark.parametrize(("problem", "expected"), [
    ("missing", "no package 'bad' (available: "),
    ("invalid", "service.nope: unknown key"),
    ("import", "version bad does not load:"),
    ("roles", "roles differ (web running, api in the package)"),
    ("domains", "service.upgrade_domains differs (2 running, 3 in the package)"),
    ("endpoints", "roles.web.endpoints differ"),
])
def test_every_preflight_refusal_of_a_deploy_exits_2_and_touches_nothing(
        make_service: MakeService, problem: str, expected: str) -> None:
    """One exit code for "refused before anything was touched", whatever the reason and
    whatever the API's status for it (an incompatible package is a 409, which exited 1)."""
    service = make_service(IDLE, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        before = {i["id"]: i["pid"] for i in h.status()["instances"]}
        toml = service.toml.read_text()
        service.toml.write_text({
            "import": toml.replace('"roles:Role"', '"roles:NoSuchRole"'),
            "roles": toml.replace("roles.web", "roles.api"),
            "domains": toml.replace("upgrade_domains = 2", "upgrade_domains = 3"),
            "endpoints": toml + f"[roles.web.endpoints.http]\nport = {free_port()}\n",
        }.get(problem, toml))
        if problem != "missing":
            h.package("bad")
        if problem == "invalid":  # a package whose definition broke in the store
            stored = h.run_dir.path / "packages/bad/rolehost.toml"
            stored.write_text(stored.read_text().replace("[service]", "[service]\nnope = 1"))
        done = rolehost("deploy", "bad", "--run-dir", str(h.run_dir.path))
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and done.stdout == "", done.stderr
        assert {i["id"]: i["pid"] for i in h.status()["instances"]} == before
        assert not [e for e in h.events() if e["event"] == "maintenance"]
        [record] = h.operations()
        assert (record["kind"], record["outcome"]) == ("deploy bad", "failed"), record


def test_a_deploy_refused_while_a_walk_is_under_way_exits_1(make_service: MakeService) -> None:
    """Not a preflight refusal: the same deploy goes through once the walk is over."""
    service = make_service(IDLE, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        h.package("v2")
        h.upgrade("agent", manual=True)
        with pytest.raises(ApiError) as busy:
            h.client.deploy("v2")
        assert (busy.value.status, busy.value.kind) == (409, "conflict")
        done = rolehost("deploy", "v2", "--run-dir", str(h.run_dir.path))
        assert done.returncode == 1 and "one operation at a time" in done.stderr, done.stderr
        h.walk_abort()
        done = rolehost("deploy", "v2", "--run-dir", str(h.run_dir.path))
        assert done.returncode == 0, done.stderr


def test_second_controller_on_the_same_run_dir_is_refused(make_service: MakeService) -> None:
    service = make_service(IDLE)
    with service.harness() as h:
        h.wait_ready(30)
        pid = h.status()["pid"]
        second = rolehost("start", "-f", str(service.toml), "--run-dir", str(h.run_dir.path))
        assert second.returncode == 1
        assert f"another controller (pid {pid}) is already running on {h.run_dir.path}" in (
            second.stderr)
        assert h.status()["instances"][0]["state"] == "ready"


def test_schema_is_json_schema_of_the_model() -> None:
    done = rolehost("schema")
    schema = json.loads(done.stdout)
    assert schema["title"] == "rolehost.toml"
    assert {"service", "roles"} <= set(schema["properties"])
    assert "entry_point" in json.dumps(schema)


def test_client_reports_no_controller(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="no controller is running"):
        Client(tmp_path / "control.sock").status()


def test_ops_and_packages_read_the_run_dir_once_the_controller_stopped(
        make_service: MakeService, tmp_path: Path) -> None:
    # `ops --help` promises the history across controller restarts: in between too.
    service = make_service(IDLE)
    where = ("-f", str(service.toml), "--run-dir", str(tmp_path / "rd"))
    with ServiceHarness(service.toml, run_dir=tmp_path / "rd") as h:
        h.wait_ready(30)
        h.maintain("restart", "web/0")
        h.package("v2")
        running = {command: rolehost(*command, *where) for command in
                   [("ops",), ("ops", "--json"), ("packages",)]}
    assert all(done.returncode == 0 for done in running.values()), running
    assert "restart" in running[("ops",)].stdout
    assert "(running)" in running[("packages",)].stdout
    for command, before in running.items():
        after = rolehost(*command, *where)
        assert after.returncode == 0, after.stderr
        expected = before.stdout.replace("  (running)", "")  # no version runs now
        assert after.stdout == expected, command
    # One a killed controller left running: shown as the next controller will record it,
    # and the file left for that controller to write.
    history = tmp_path / "rd" / "history.jsonl"
    history.write_text(history.read_text() + json.dumps(
        {"kind": "scale web", "arguments": {}, "id": "cut0ff00", "started": 1.0}) + "\n")
    kept = history.read_text()
    last = json.loads(rolehost("ops", "--json", *where).stdout)["operations"][-1]
    assert (last["id"], last["outcome"]) == ("cut0ff00", "interrupted")
    assert history.read_text() == kept
    nothing = rolehost("ops", "--run-dir", str(tmp_path / "never-used"))
    assert nothing.returncode == 1 and "no controller is running" in nothing.stderr


def test_every_route_of_the_control_api_is_in_docs_api() -> None:
    """The route table at the top of docs/api.md lists each route the API serves."""
    from rolehost.control import api

    table = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\| `(GET|POST|DELETE)` \| `([^`?]+)[^`]*` \|", table, re.M))
    served = {(method, "/" + "/".join(parts)) for method, parts, _ in api._ROUTES}
    assert served == documented


# Not ready while the file in setting `gate` exists.
GATED = """
class Role(RoleEntryPoint):
    def on_start(self):
        while os.path.exists(RoleEnvironment.get_setting("gate")):
            time.sleep(0.05)
        return True
"""


@pytest.mark.parametrize("command", [("scale", "web", "2"), ("restart", "web/0", "--wait")])
def test_a_command_waiting_on_a_controller_that_dies_says_so_in_one_line(
        make_service: MakeService, tmp_path: Path, command: tuple[str, ...]) -> None:
    gate = tmp_path / "gate"
    service = make_service(GATED, settings={"gate": str(gate)})
    with service.harness() as h:
        h.wait_ready(30)
        gate.touch()
        waiting = subprocess.Popen(
            [sys.executable, "-m", "rolehost", *command, "--run-dir", str(h.run_dir.path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: "starting" in {i["state"] for i in h.status()["instances"]}, 30,
                       "an instance held in on_start", lambda: str(h.status()["instances"]))
            assert waiting.poll() is None  # the command waits for it
            assert h.controller is not None
            h.controller.kill()
            h.controller.wait(10)
            out, err = waiting.communicate(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait(10)
        assert waiting.returncode == 1, (out, err)
        assert err == ("rolehost: the controller closed the connection before it answered: it "
                       "has exited or was killed (`rolehost logs` tells why)\n"), err
