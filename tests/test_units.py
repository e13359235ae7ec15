"""Pure logic: durations, names, definition errors, the transition table, the event log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rolehost import definition
from rolehost.fabric.names import parse_instance_name
from rolehost.observability.logs import RotatingFile, describe, tail


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25),
     ("2", 2.0), ("168h", 604800.0), (604800, 604800.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert definition.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "", "-1s", True, [1], float("nan"),
                                  float("inf"), -0.5, " 5m", "5m ", "5 m", "5m\n", "\u0665s"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        definition.parse_duration(text)


@pytest.mark.parametrize("text", ["3000000h", "169h", 604800.5, 1e300])
def test_durations_are_at_most_a_week(text: object) -> None:
    # More would be a typo, and waits of over threading.TIMEOUT_MAX raise (`stop` hung).
    with pytest.raises(ValueError, match=r"at most 7 days \(604800 seconds\)"):
        definition.parse_duration(text)
    [error] = _role_errors({"stop_timeout": text})
    assert error.startswith("svc.toml: roles.w.stop_timeout: a duration must be at most 7 days")
    number = definition.json_schema()["$defs"]["Role"]["properties"]["stop_timeout"]["anyOf"][0]
    assert number["maximum"] == 604800


def test_instance_names() -> None:
    assert parse_instance_name("web/0") == ("web", 0)
    assert parse_instance_name("web_IN_12") == ("web", 12)
    assert parse_instance_name("my_role_IN_3") == ("my_role", 3)
    # a role the definition could name, never a path: `rolehost logs ../x/0` reads no file
    for bad in ("web", "web/x", "/0", "web_IN_", "a/b/0", "../../x/0", "../x_IN_0"):
        with pytest.raises(ValueError, match="not an instance name"):
            parse_instance_name(bad)


def test_defaults_are_the_platforms() -> None:
    d = definition.parse({"service": {"name": "s"}, "roles": {"w": {"entry_point": "m:C"}}})
    assert d.service.upgrade_domains == 5
    assert d.service.ready_deadline == 1800.0  # 30 minutes
    assert d.roles["w"].stop_timeout == 300.0  # 5 minutes
    assert (d.service.stable_after, d.service.backoff_initial, d.service.backoff_max) == (
        60.0, 1.0, 60.0)


def test_every_error_is_reported_with_its_key_path() -> None:
    raw = {
        "service": {"name": "s", "upgrade_domains": 50, "backof_max": 1},
        "roles": {"w": {"entry_point": "no-colon", "local_resources": {"c": {"size_mb": 0}}}},
    }
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse(raw, Path("svc.toml"))
    messages = [str(e) for e in caught.value.errors]
    assert any(m.startswith("svc.toml: service.upgrade_domains: expected less than or equal to 20")
               for m in messages)
    assert "svc.toml: service.backof_max: unknown key; did you mean 'backoff_max'?" in messages
    assert any(m.startswith("svc.toml: roles.w.entry_point:") for m in messages)
    assert any(m.startswith("svc.toml: roles.w.local_resources.c.size_mb:") for m in messages)


def test_app_is_resolved_beside_the_definition(tmp_path: Path) -> None:
    raw = {"service": {"name": "s"}, "roles": {"w": {"entry_point": "m:C", "app": "src"}}}
    d = definition.parse(raw, tmp_path / "rolehost.toml")
    assert d.roles["w"].app == (tmp_path / "src").resolve()


def test_rotating_file(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "x.log", max_bytes=100, backups=2)
    for n in range(30):
        log.write(f"line {n:02d} .......\n".encode())
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["x.log", "x.log.1", "x.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert tail(tmp_path / "x.log", 1) == ["line 29 ......."]


def test_event_lines() -> None:
    assert describe({"event": "state", "instance": "w_IN_0", "previous": "starting",
                     "state": "ready", "reason": None}) == "w_IN_0: starting -> ready"
    line = describe({"event": "host_exited", "instance": "w_IN_0", "level": "info",
                     "outcome": "killed by SIGKILL"})
    assert line == "w_IN_0: host exited outcome=killed by SIGKILL"


def test_the_event_ring_keeps_each_event_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog

    from rolehost.observability import logs

    monkeypatch.setattr(logs, "_tee", None)
    logs.configure(tmp_path, None)
    try:
        progress = {"web_IN_0": "pending"}
        structlog.get_logger().info("walk_step", progress=progress)
        progress["web_IN_0"] = "done"  # the walk goes on after it logged
        [event] = [e for e in logs.recent() if e["event"] == "walk_step"]
        assert event["progress"] == {"web_IN_0": "pending"}
        line = (tmp_path / "controller.log").read_text().splitlines()[-1]
        assert json.loads(line) == event  # the ring and the file say the same
        assert logs.recent(event["seq"]) == []
    finally:
        structlog.reset_defaults()


def test_history_keeps_the_last_operations_in_memory_and_all_in_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rolehost.fabric import history

    monkeypatch.setattr(history, "KEPT", 5)
    path = tmp_path / "history.jsonl"
    kept = history.History(path)
    running = kept.begin("upgrade host-os", {}, ["web_IN_0"])  # the oldest, never ended
    halted = kept.begin("deploy v2", {}, ["web_IN_1"])  # waits for an `abort`
    kept.halted(halted, "halted in update domain 1: web_IN_1 did not become ready")
    ended = []
    for n in range(8):
        operation = kept.begin("restart", {"n": n}, ["web_IN_1"])
        kept.end(operation, "succeeded")
        ended.append(operation.id)
    # Bounded, oldest ended ones dropped first, the running and halted ones kept whatever
    # their age; the halted one counts as not succeeded.
    assert list(kept.operations) == [running.id, halted.id, *ended[-3:]]
    assert kept.summary()["success_rate"] == 0.75
    lines = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert set(lines) == {running.id, halted.id, *ended}  # the file forgets nothing

    # The next controller: the never-ended ones are now ended (interrupted; failed, as an
    # `abort` would have), and the oldest: in the file, no longer in memory.
    reloaded = history.History(path)
    assert list(reloaded.operations) == ended[-5:]
    last = [json.loads(line) for line in path.read_text().splitlines()[-2:]]
    assert [(o["id"], o["outcome"]) for o in last] == [(running.id, "interrupted"),
                                                       (halted.id, "failed")], last
    assert last[1]["error"] == ("halted in update domain 1: web_IN_1 did not become ready; "
                                "the controller stopped while the walk was halted")


def _role_errors(role: dict[str, object]) -> list[str]:
    raw = {"service": {"name": "s"}, "roles": {"w": {"entry_point": "m:C", **role}}}
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse(raw, Path("svc.toml"))
    return [str(e) for e in caught.value.errors]


@pytest.mark.parametrize(
    ("role", "expected"),
    [({"settings": {"A=B": 1}}, "svc.toml: roles.w.settings.A=B: expected a name that is not "
                                "empty, without '=' or NUL"),
     ({"settings": {"": 1}}, "svc.toml: roles.w.settings.: expected a name"),
     ({"settings": {"key": "abc\0def"}},
      "svc.toml: roles.w.settings.key: expected a value without NUL characters"),
     ({"settings": {"key": {"value": "abc\0def", "secret": True}}},
      "svc.toml: roles.w.settings.key: expected a value without NUL characters"),
     ({"settings": {"db-host": "a", "db_host": "b"}},
      "svc.toml: roles.w.settings.db_host: expected a name of its own: 'db-host' is passed as "
      "ROLEHOST_SETTING_DB_HOST too"),
     ({"settings": {"Color": "a", "color": "b"}}, "'Color' is passed as ROLEHOST_SETTING_COLOR"),
     ({"local_resources": {"a-b": {}, "a_b": {}}},
      "svc.toml: roles.w.local_resources.a_b: expected a name of its own: 'a-b' is passed as "
      "ROLEHOST_RESOURCE_A_B too"),
     ({"startup_tasks": [{"command": "true", "env": {"A=B": "x"}}]},
      "svc.toml: roles.w.startup_tasks[0].env.A=B: expected a name"),
     ({"startup_tasks": [{"command": "true", "env": {"A": "x\0"}}]},
      "svc.toml: roles.w.startup_tasks[0].env.A: expected a value without NUL"),
     ({"settings": {"ratio": float("nan")}},
      "svc.toml: roles.w.settings.ratio: expected a finite number"),
     ({"settings": {"ratio": {"value": float("inf"), "secret": True}}},
      "svc.toml: roles.w.settings.ratio: expected a finite number")],
    ids=["equals-in-name", "empty-name", "nul-in-value", "nul-in-secret", "same-variable",
         "same-variable-by-case", "same-resource-variable", "task-env-name", "task-env-value",
         "nan", "infinite-secret"],
)
def test_what_cannot_go_into_the_environment_is_refused(
        role: dict[str, object], expected: str) -> None:
    messages = _role_errors(role)
    assert any(m.startswith(expected) or expected in m for m in messages), messages
    assert not any("abc" in m for m in messages)  # a value, perhaps a secret, never shows


def test_settings_and_resources_may_share_a_name() -> None:
    d = definition.parse({"service": {"name": "s"}, "roles": {"w": {
        "entry_point": "m:C", "settings": {"cache": "x", "db.host": "h"},
        "local_resources": {"cache": {}}}}})
    assert d.roles["w"].values == {"cache": "x", "db.host": "h"}


def test_a_role_alone_is_checked_as_in_a_definition() -> None:
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse_role("w", {"entry_point": "m:C", "settings": {"k": "s\0", "n": [1]}})
    assert [str(e) for e in caught.value.errors] == [
        "roles.w.settings.n: expected a string, number or boolean, or a table "
        "{ value = ..., secret = true }"]


@pytest.mark.parametrize(
    ("task", "expected"),
    [({"command": "echo 'unterminated"}, "expected a command that splits like a shell's (or "
                                         "shell = true): No closing quotation"),
     ({"command": "'' --flag"}, "expected a program to run, got an empty first word"),
     ({"command": ["", "x"]}, "expected a program to run, got an empty first word"),
     ({"command": ["echo", "a\0b"]}, "expected a command without NUL characters"),
     ({"command": "echo a\0b", "shell": True}, "expected a command without NUL characters")],
    ids=["unterminated-quote", "empty-program", "empty-program-list", "nul", "nul-shell"],
)
def test_a_task_command_that_cannot_run_is_refused(
        task: dict[str, object], expected: str) -> None:
    assert _role_errors({"startup_tasks": [{"command": "true"}, task]}) == [
        f"svc.toml: roles.w.startup_tasks[1].command: {expected}"]


def test_a_shell_parses_its_own_command() -> None:
    task = definition.StartupTask(command="echo 'unterminated", shell=True)
    assert task.command == "echo 'unterminated"  # /bin/sh reports it, as it would any typo


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("stable_after", "0s", "expected greater than or equal to 0.5"),
     ("stable_after", "499ms", "expected greater than or equal to 0.5"),
     ("backoff_initial", "0s", "expected greater than or equal to 0.1"),
     ("backoff_initial", "50ms", "expected greater than or equal to 0.1"),
     ("backoff_max", 0, "expected greater than or equal to 0.1")],
)
def test_a_crash_loop_is_never_a_tight_one(key: str, value: object, expected: str) -> None:
    # stable_after = 0 made every crash one "after a stable run": ~35 restarts a second.
    raw = {"service": {"name": "s", key: value}, "roles": {"w": {"entry_point": "m:C"}}}
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse(raw, Path("svc.toml"))
    assert str(caught.value.errors[0]).startswith(f"svc.toml: service.{key}: {expected}")


def test_the_shortest_back_off_is_allowed() -> None:
    d = definition.parse({"service": {"name": "s", "stable_after": "500ms",
                                      "backoff_initial": "100ms", "backoff_max": "100ms"},
                          "roles": {"w": {"entry_point": "m:C"}}})
    assert (d.service.stable_after, d.service.backoff_initial) == (0.5, 0.1)


TAKEN = "roles.api.endpoints.http.port: port 18480 is already used by roles.web.endpoints.http.port"


@pytest.mark.parametrize(
    ("api", "service", "expected"),
    [({"port": 18480, "host": "localhost"}, {}, TAKEN),
     ({"port": 18480, "host": "0.0.0.0"}, {}, TAKEN),
     ({"port": 18481, "host": "::1"}, {"metrics": "localhost:18481"},
      "roles.api.endpoints.http.port: port 18481 is already used by service.metrics"),
     ({"port": 18481}, {"metrics": "127.0.0.1:18480"},
      "roles.web.endpoints.http.port: port 18480 is already used by service.metrics")],
    ids=["localhost", "any-address", "metrics-other-host", "metrics-same-host"],
)
def test_a_port_is_used_once_whatever_the_address_is_called(
        api: dict[str, object], service: dict[str, object], expected: str) -> None:
    raw = {"service": {"name": "s", **service}, "roles": {
        "web": {"entry_point": "m:C", "endpoints": {"http": {"port": 18480}}},
        "api": {"entry_point": "m:C", "endpoints": {"http": api}}}}
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse(raw, Path("svc.toml"))
    assert [str(e) for e in caught.value.errors] == [f"svc.toml: {expected}"]


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:0",
                                     "localhost:", ":9464", "h:80\n", "h h:80", "::1:9464",
                                     "[::1]", "[:::1]:80", "[127.0.0.1]:80", "[fe80::1%lo]:80",
                                     "127.0.0.1:\u0668\u0660"])
def test_the_metrics_port_is_one_that_can_be_bound(address: str) -> None:
    raw = {"service": {"name": "s", "metrics": address}, "roles": {"w": {"entry_point": "m:C"}}}
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse(raw, Path("svc.toml"))
    assert [str(e) for e in caught.value.errors] == [
        "svc.toml: service.metrics: expected HOST:PORT, with a host (0.0.0.0 for every "
        "interface, [::1] for an IPv6 address) and a port from 1 to 65535, "
        f"got {address!r}"]


@pytest.mark.parametrize(("address", "host", "port"), [
    ("localhost:9464", "localhost", 9464), ("0.0.0.0:1", "0.0.0.0", 1),
    ("[::1]:9464", "::1", 9464), ("[2001:DB8::1]:65535", "2001:DB8::1", 65535),
    ("[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80), ("[::]:80", "::", 80)])
def test_an_ipv6_metrics_address_is_in_brackets_as_the_cli_takes_it(
        address: str, host: str, port: int) -> None:
    # One rule for HOST:PORT: the model refused [::1]:9464, which --health took.
    from rolehost.cli.tools import _address

    raw = {"service": {"name": "s", "metrics": address}, "roles": {"w": {"entry_point": "m:C"}}}
    assert definition.parse(raw).service.metrics == address
    assert _address(None, None, address) == (host, port)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, "0s", "0ms"])
def test_a_task_timeout_is_more_than_0(timeout: object) -> None:
    # 0 was accepted, and then every boot failed: "timed out after 0s".
    assert _role_errors({"startup_tasks": [{"command": "true", "timeout": timeout}]}) == [
        f"svc.toml: roles.w.startup_tasks[0].timeout: expected greater than 0, got {timeout!r}"]


@pytest.mark.parametrize("where", ["service.name", "roles.NAME", "roles.w.endpoints.NAME",
                                   "roles.w.local_resources.NAME"])
def test_names_are_at_most_63_characters(where: str) -> None:
    def document(name: str) -> dict[str, object]:
        role: dict[str, object] = {"entry_point": "m:C", "endpoints": {"e": {"port": 1}},
                                   "local_resources": {"r": {}}}
        if where == "roles.w.endpoints.NAME":
            role["endpoints"] = {name: {"port": 1}}
        if where == "roles.w.local_resources.NAME":
            role["local_resources"] = {name: {}}
        return {"service": {"name": name if where == "service.name" else "s"},
                "roles": {name if where == "roles.NAME" else "w": role}}

    definition.parse(document("n" * 63))
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.parse(document("n" * 64), Path("svc.toml"))
    path = where.replace("NAME", "n" * 64)
    assert [str(e) for e in caught.value.errors] == [
        f"svc.toml: {path}: expected a string of at most 63 characters, got {'n' * 64!r}"]


@pytest.mark.parametrize(
    ("role", "expected"),
    [({"instances": "2"}, "roles.w.instances: expected an integer, got '2'"),
     ({"instances": True}, "roles.w.instances: expected an integer, got True"),
     ({"instances": 2.5}, "roles.w.instances: expected an integer, got 2.5"),
     ({"endpoints": {"e": {"port": "8080"}}},
      "roles.w.endpoints.e.port: expected an integer, got '8080'"),
     ({"endpoints": {"e": {"port": 1, "ignore_status": 1}}},
      "roles.w.endpoints.e.ignore_status: expected a boolean, got 1"),
     ({"endpoints": {"e": {"port": 1, "probe": {"healthy": "3"}}}},
      "roles.w.endpoints.e.probe.healthy: expected an integer, got '3'"),
     ({"local_resources": {"c": {"clean_on_recycle": "false"}}},
      "roles.w.local_resources.c.clean_on_recycle: expected a boolean, got 'false'"),
     ({"startup_tasks": [{"command": "true", "shell": "true"}]},
      "roles.w.startup_tasks[0].shell: expected a boolean, got 'true'"),
     ({"startup_tasks": [{"command": 5}]},
      "roles.w.startup_tasks[0].command: expected a string or a list, got 5"),
     ({"app": 5}, "roles.w.app: expected a path (a string), got 5"),
     ({"stop_timeout": " 5 m "}, "roles.w.stop_timeout: expected a duration such as 90, "
                                 "\"90s\", \"5m\" or \"1h\", got ' 5 m '")],
    ids=["string-int", "bool-int", "fraction-int", "string-port", "int-bool", "string-probe",
         "string-bool", "string-shell", "int-command", "int-path", "spaced-duration"],
)
def test_a_value_of_the_wrong_type_is_not_converted(role: dict[str, object],
                                                    expected: str) -> None:
    # Pydantic's lax mode took all of these (but the path and the command), converted.
    assert _role_errors(role) == [f"svc.toml: {expected}"]


def test_a_secret_flag_is_a_boolean() -> None:
    # The message is the setting's (whichever form was meant), never its value.
    assert _role_errors({"settings": {"t": {"value": "hush", "secret": "yes"}}}) == [
        "svc.toml: roles.w.settings.t: expected a string, number or boolean, or a table "
        "{ value = ..., secret = true }"]


def test_an_integral_float_is_not_an_integer() -> None:
    # TOML's 2.0 is a float: refused as "2" is, though JSON Schema's "integer" takes it.
    assert _role_errors({"instances": 2.0}) == [
        "svc.toml: roles.w.instances: expected an integer, got 2.0"]


def test_a_dumped_role_validates_as_it_was() -> None:
    # controller.configure re-validates role.model_dump(): Paths, enums, floats in it.
    raw = {"entry_point": "m:C", "app": "src", "instances": 3, "stop_timeout": "5m",
           "settings": {"plain": "8080", "n": 2, "on": True, "hush": {"value": "x"}},
           "endpoints": {"e": {"port": 18080, "protocol": "tcp", "balance": "least-outstanding",
                               "ignore_status": True, "probe": {"healthy": 2}}},
           "local_resources": {"c": {"size_mb": 5, "clean_on_recycle": False}},
           "startup_tasks": [{"command": ["true"], "type": "background", "context": "elevated",
                              "once_per": "disk", "timeout": 1.5, "env": {"A": "b"}}]}
    role = definition.parse_role("w", raw)
    assert definition.parse_role("w", role.model_dump()) == role
    assert definition.parse_role("w", {**role.model_dump(), "settings": role.settings}) == role


@pytest.mark.parametrize(("text", "value"), [
    ("8", 8), ("-3", -3), ("+5", 5), (" 8\n", 8), ("1_000", 1000), ("0.5", 0.5),
    ("1e3", 1000.0), ("true", True), ("false", False), ("green", "green"), ("NaN", "NaN"),
    ("1e400", "1e400"), ("inf", "inf"), ("yes", "yes"), ("on", "on"), ("1", 1), ("True", "True"),
    ("08540", "08540"), (".5", ".5"), ("\u0663", "\u0663"), (" x ", " x "), ("", "")])
def test_a_setting_without_a_declared_type_reads_as_its_text_says(
        text: str, value: object) -> None:
    # `config set KEY=VALUE`: numbers and true/false as TOML writes them; else the text.
    from rolehost.definition.scalars import setting_from_text

    read = setting_from_text(text)
    assert (read, type(read)) == (value, type(value))


@pytest.mark.parametrize(("text", "declared", "value"), [
    (" 8\n", 0, 8), ("+5", 0, 5), ("1_000", 0, 1000), ("2", 0.5, 2.0), ("1e3", 0.5, 1000.0),
    ("TRUE", False, True), ("off", True, False), ("1", False, True), ("0", True, False),
    (" s3cr3t ", "", " s3cr3t ")])
def test_a_setting_with_a_declared_type_reads_as_that_type(
        text: str, declared: Any, value: object) -> None:
    from rolehost.definition.scalars import setting_from_text

    read = setting_from_text(text, declared)
    assert (read, type(read)) == (value, type(value))


@pytest.mark.parametrize(("text", "declared"), [
    ("08", 0), ("2.0", 0), ("\u0663", 0), ("1" * 5000, 0), (".5", 0.5), ("nan", 0.5),
    ("1e400", 0.5), ("maybe", True), ("", True)])
def test_a_setting_not_of_its_declared_type_is_refused(text: str, declared: Any) -> None:
    from rolehost.definition.scalars import setting_from_text

    with pytest.raises(ValueError, match=r"^(an integer|a finite number|true or false)"):
        setting_from_text(text, declared)


@given(st.text(st.sampled_from("0123456789+-._eE tTrRuUfFaAlLsS"), max_size=8))
@settings(max_examples=300, derandomize=True, database=None)
def test_config_set_and_run_instance_read_a_setting_alike(text: str) -> None:
    """One rule for a setting given as text: what `config set` reads a text as, a setting
    of that type under run-instance reads it as too. (The CLI read JSON, run-instance
    Python's int() and float(): "+5" was a string to one and 5 to the other.)"""
    from rolehost.definition.scalars import setting_from_text

    read = setting_from_text(text)
    if not isinstance(read, str):
        assert setting_from_text(text, type(read)()) == read


def test_durations_on_the_command_line_are_read_as_in_the_definition() -> None:
    # Not through CliRunner: an invocation leaves click's help option cached on the
    # commands, and docs/cli.md, generated in this process later, would differ.
    import click

    from rolehost.cli import cli

    command = cli.commands["run-instance"]
    drain = next(p for p in command.params if p.name == "drain_delay")
    context = click.Context(command)
    assert drain.process_value(context, "1.5") == drain.process_value(context, "1500ms") == 1.5
    for bad in ("-1", "nan", "5 m", "8d"):  # click's float took the first two
        with pytest.raises(click.BadParameter, match="duration"):
            drain.process_value(context, bad)


def test_the_instance_range_is_the_models_everywhere() -> None:
    from rolehost.cli import cli

    scale: Any = cli.commands["scale"].params[1].type
    assert (scale.min, scale.max) == (definition.MIN_INSTANCES, definition.MAX_INSTANCES)
    instances = definition.json_schema()["$defs"]["Role"]["properties"]["instances"]
    assert (instances["minimum"], instances["maximum"]) == (1, 1000)


def test_an_app_folder_with_a_nul_is_a_key_path_error(tmp_path: Path) -> None:
    # Resolving it beside the definition raised ValueError: `rolehost check` printed a
    # traceback.
    toml = tmp_path / "rolehost.toml"
    toml.write_text('[service]\nname = "s"\n[roles.w]\nentry_point = "m:C"\napp = "a\\u0000"\n')
    with pytest.raises(definition.DefinitionErrors) as caught:
        definition.load(toml)
    assert [str(e) for e in caught.value.errors] == [
        f"{toml}: roles.w.app: expected a path without NUL characters"]
