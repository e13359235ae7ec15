"""Configuration changes and scaling while the service runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rolehost.client import ApiError
from rolehost.definition import Definition
from rolehost.testing import wait_until
from support.roles import WATCHES_TOPOLOGY
from support.service import MakeService

ROLE = """
class Role(RoleEntryPoint):
    def on_start(self):
        RoleEnvironment.on_changing(self.changing)
        RoleEnvironment.on_changed(self.changed)
        probe(f"start color={RoleEnvironment.get_setting('color')}")
        return True

    def changing(self, event):
        probe("changing " + ",".join(f"{c.name}:{c.old}->{c.new}" for c in event.changes))
        if RoleEnvironment.get_setting("cancel"):
            event.cancel()

    def changed(self, changes):
        probe(f"changed color={RoleEnvironment.get_setting('color')}")
"""


def test_settings_change_in_place(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, settings={"color": "blue", "cancel": False})
    with service.harness() as h:
        h.wait_ready(30)
        pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "config", "set", "web", "color=green",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["web_IN_0: applied", "web_IN_1: applied"]
        for i in (0, 1):
            assert f"changing color:blue->green web_IN_{i}" in service.probes()
            assert f"changed color=green web_IN_{i}" in service.probes()
        # NaN is no JSON number: the CLI passes it on as the string it is, and the API
        # refuses a non-finite number (the history could not be read back as JSON).
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "config", "set", "web", "color=NaN",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        service.wait_probe("changed color=NaN web_IN_1")
        with pytest.raises(ApiError, match="expected a finite number"):
            h.client.configure("web", {"color": float("inf")})
        assert {i["id"]: i["pid"] for i in h.status()["instances"]} == pids  # no restart
        kinds = [(r["kind"], r["outcome"]) for r in h.operations()]
        assert kinds == [("config web", "succeeded")] * 2


def test_a_cancelled_change_recycles_to_apply(make_service: MakeService) -> None:
    service = make_service(ROLE, settings={"color": "blue", "cancel": True})
    with service.harness() as h:
        h.wait_ready(30)
        before = h.instance("web/0")["pid"]
        assert h.set_setting("web", "color", "red") == {"web_IN_0": "recycled"}
        assert h.instance("web/0")["pid"] != before
        assert service.probes()[-1] == "start color=red web_IN_0"


# Probes the setting variables as the host, a process it starts now, and a process it
# started before the change see them ("-": unset).
SEES = ("import os; print(','.join(os.environ.get('ROLEHOST_SETTING_' + n, '-')"
        " for n in ('COLOR', 'SHADE')))")
ENVIRONMENT = f"""
SEES = {SEES!r}

class Role(RoleEntryPoint):
    def on_start(self):
        self.before = subprocess.Popen([sys.executable, "-c", "input(); " + SEES],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        RoleEnvironment.on_changed(self.changed)
        return True

    def changed(self, changes):
        own = ",".join(os.environ.get("ROLEHOST_SETTING_" + n, "-") for n in ("COLOR", "SHADE"))
        now = subprocess.run([sys.executable, "-c", SEES], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        seen = f"changed own={{own}} started-now={{now}}"
        if self.before is not None:
            seen += " started-before=" + self.before.communicate("\\n", 30)[0].strip()
            self.before = None
        probe(seen)
"""


def test_a_change_in_place_updates_the_setting_variables_of_the_host(
    make_service: MakeService,
) -> None:
    """get_setting had the new value, ROLEHOST_SETTING_NAME the old one: a process the
    role started after the change was given the old settings."""
    service = make_service(ENVIRONMENT, settings={"color": "blue", "shade": "dark"})
    with service.harness() as h:
        h.wait_ready(30)
        pid = h.instance("web/0")["pid"]
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "config", "set", "web", "color=green",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["web_IN_0: applied"]
        service.wait_probe("changed own=green,dark started-now=green,dark "
                           "started-before=blue,dark web_IN_0")
        # A setting removed from the file: its variable goes too.
        service.toml.write_text(service.toml.read_text().replace('shade = "dark"\n', ""))
        service.wait_probe("changed own=green,- started-now=green,- web_IN_0")
        assert h.instance("web/0")["pid"] == pid  # applied in place, both times


HELD = ROLE.replace(
    '        probe(f"start color',
    '        while os.path.exists(RoleEnvironment.get_setting("probe") + ".hold"):\n'
    '            time.sleep(0.05)\n'
    '        probe(f"start color',
)


def test_a_change_while_on_start_runs_is_offered_once_it_is_ready(
    make_service: MakeService,
) -> None:
    """The host got its settings when it started: 'at the next start' would leave it on
    the old ones until some later restart."""
    service = make_service(HELD, settings={"color": "blue", "cancel": False},
                           service={"backoff_initial": "0.1s"})
    with service.harness() as h:
        h.wait_ready(30)
        hold = Path(f"{service.probe}.hold")
        hold.touch()
        h.kill("web/0")  # a recycle of its own: no operation holds the service
        h.wait_state("web/0", "starting", 30)
        outcome: list[dict[str, str]] = []
        change = threading.Thread(
            target=lambda: outcome.append(h.set_setting("web", "color", "red")))
        change.start()
        wait_until(lambda: [r["kind"] for r in h.operations()] == ["config web"], 30,
                   "the change to begin")
        hold.unlink()
        change.join(60)
        assert outcome == [{"web_IN_0": "applied"}]
        service.wait_probe("changed color=red web_IN_0")  # sent, not waited for
        assert service.probes()[-3:] == ["start color=blue web_IN_0",
                                         "changing color:blue->red web_IN_0",
                                         "changed color=red web_IN_0"]


def test_editing_the_definition_applies_settings_and_reports_the_rest(
    make_service: MakeService,
) -> None:
    service = make_service(ROLE, settings={"color": "blue", "cancel": False})
    with service.harness() as h:
        h.wait_ready(30)
        text = service.toml.read_text()
        service.toml.write_text(text.replace('color = "blue"', 'color = "teal"'))
        service.wait_probe("changed color=teal web_IN_0", timeout=10)
        service.toml.write_text(text.replace('color = "blue"', 'color = "teal"')
                                .replace("roles:Role", "roles:Other"))
        event = h.wait_event(lambda e: e["event"] == "needs_deploy", 10)
        assert event["changed"] == ["roles.web.entry_point"]
        shutil.copytree(service.toml.parent / "app", service.toml.parent / "app2")
        service.toml.write_text(text.replace('color = "blue"', 'color = "teal"')
                                .replace('app = "app"', 'app = "app2"'))
        h.wait_event(lambda e: e["event"] == "needs_deploy"
                     and e["changed"] == ["roles.web.app"], 10, "needs_deploy for the app")
        service.toml.write_text("[service\\n")  # broken: reported, nothing applied
        h.wait_event(lambda e: e["event"] == "definition_invalid", 10)
        assert h.instance("web/0")["state"] == "ready"


def test_an_edit_applies_what_it_changed_in_the_file_not_the_rest_of_it(
    make_service: MakeService,
) -> None:
    """A setting set at run time (`config set`), or a count (`scale`), stays as it is
    when an edit of the file changes something else."""
    service = make_service(ROLE, settings={"color": "blue", "cancel": False})
    with service.harness() as h:
        h.wait_ready(30)
        assert h.set_setting("web", "color", "green") == {"web_IN_0": "applied"}
        text = service.toml.read_text()
        service.toml.write_text(text.replace("instances = 1", "instances = 2"))
        wait_until(lambda: [(r["kind"], r["outcome"]) for r in h.operations()][1:] == [
            ("scale web", "succeeded")], 30, "the scale the edit asked for",
            lambda: str(h.operations()))
        service.wait_probe("start color=green web_IN_1")
        assert "changing color:green->blue web_IN_0" not in service.probes()
        # An edit of another setting changes that one only; the count set by `scale`
        # stays, though the file still says 2.
        assert h.scale("web", 3) == ["web_IN_2"]
        service.toml.write_text(text.replace("instances = 1", "instances = 2") + "size = 3\n")
        def changed(i: int) -> bool:
            lines = [line for line in service.probes() if line.endswith(f" web_IN_{i}")]
            asked = f"changing size:None->3 web_IN_{i}"
            return asked in lines and (f"changed color=green web_IN_{i}"
                                       in lines[lines.index(asked):])

        for i in (0, 1, 2):
            wait_until(lambda: changed(i), 30, f"the change of size on web_IN_{i}",  # noqa: B023
                       lambda: "\n".join(service.probes()))
        assert not any("color:green->blue" in line for line in service.probes())
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0", "web_IN_1",
                                                              "web_IN_2"]
        config = [r for r in h.operations() if r["arguments"].get("cause") == "definition "
                  "edited"]
        assert [(r["kind"], r["outcome"]) for r in config] == [
            ("scale web", "succeeded"), ("config web", "succeeded")]
        assert config[1]["arguments"]["settings"]["color"] == "green"


def test_what_an_edit_changes_is_what_it_changed_in_the_file() -> None:
    from rolehost.definition import Secret, parse
    from rolehost.fabric.edits import definition_changes

    def service(instances: int, **settings: object) -> Definition:
        return parse({"service": {"name": "s"}, "roles": {"web": {
            "entry_point": "m:C", "instances": instances, "settings": settings}}})

    before = service(2, color="blue", size=1, token={"value": "t", "secret": True})
    # Run time: `config set color=green extra=1`, `scale web 3`.
    running = service(3, color="green", size=1, extra=1,
                      token={"value": "t", "secret": True})
    unchanged: dict[str, object] = {"settings": {}, "instances": {}, "deploy": []}
    assert definition_changes(running, before, before) == unchanged
    assert definition_changes(running, service(3, color="blue", size=1, token={
        "value": "t", "secret": True}), before) == unchanged  # the count runs already
    changes = definition_changes(running, service(4, color="blue", token={
        "value": "u", "secret": True}), before)
    assert changes["instances"] == {"web": 4}
    assert changes["settings"] == {"web": {"color": "green", "extra": 1,
                                           "token": Secret(value="u")}}  # size removed
    # With no `before`, the file is compared with what runs (as before this change).
    assert definition_changes(running, before)["settings"]["web"]["color"] == "blue"


def test_settings_the_environment_cannot_carry_are_refused_and_nothing_changes(
    make_service: MakeService,
) -> None:
    service = make_service(ROLE, settings={"color": "blue", "cancel": False, "db-host": "x"},
                           extra='[roles.web.settings.token]\nvalue = "t"\nsecret = true\n')
    with service.harness() as h:
        h.wait_ready(30)
        pid = h.instance("web/0")["pid"]
        for settings, expected in [
            ({"A=B": 1}, "roles.web.settings.A=B: expected a name that is not empty"),
            ({"color": "gr\0een"}, "roles.web.settings.color: expected a value without NUL"),
            ({"db_host": "y"}, "roles.web.settings.db_host: expected a name of its own: "
                               "'db-host' is passed as ROLEHOST_SETTING_DB_HOST too"),
            ({"token": ["hidden"]}, "roles.web.settings.token: expected a string, number"),
        ]:
            with pytest.raises(ApiError) as refused:
                h.client.configure("web", settings)
            assert (refused.value.status, refused.value.kind) == (400, "invalid"), refused.value
            assert f"invalid settings for web:\n{expected}" in str(refused.value)
            assert "een" not in str(refused.value) and "hidden" not in str(refused.value)
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "config", "set", "web", "db_host=y",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "roles.web.settings.db_host: expected a name of its own" in done.stderr
        assert h.instance("web/0")["pid"] == pid
        assert not any(line.startswith("changing") for line in service.probes())
        assert h.operations() == []


def test_scale_out_and_in(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, settings={"color": "blue", "cancel": False},
                           service={"upgrade_domains": 2})
    with service.harness() as h:
        h.wait_ready(30)
        assert h.scale("web", 3) == ["web_IN_2"]
        status = h.wait_ready(30)
        assert [(i["id"], i["update_domain"]) for i in status["instances"]] == [
            ("web_IN_0", 0), ("web_IN_1", 1), ("web_IN_2", 0)]
        removed = h.client.scale("web", 1)
        assert removed == ["web_IN_1", "web_IN_2"]
        assert [i["id"] for i in h.status()["instances"]] == ["web_IN_0"]
        wait_until(lambda: len(h.processes()) == 3, 10, "controller, standby, web_IN_0")


def test_scaling_tells_the_other_instances_about_the_topology(make_service: MakeService) -> None:
    service = make_service(WATCHES_TOPOLOGY, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        assert "start roles=web_IN_0,web_IN_1 web_IN_0" in service.probes()
        h.client.scale("web", 3)
        h.wait_ready(30)
        for i in (0, 1):
            service.wait_probe(f"changing web web_IN_{i}")
            service.wait_probe(f"changed roles=web_IN_0,web_IN_1,web_IN_2 web_IN_{i}")
        assert "start roles=web_IN_0,web_IN_1,web_IN_2 web_IN_2" in service.probes()


# A new mode or topology needs a restart (its handler cancels); the mode "bad", or
# more than `most` instances, never start.
FRAGILE = """
class Role(RoleEntryPoint):
    def on_start(self):
        if RoleEnvironment.get_setting("mode") == "bad":
            raise RuntimeError("mode bad")
        if len(RoleEnvironment.roles["web"]) > RoleEnvironment.get_setting("most"):
            raise RuntimeError("too many")
        RoleEnvironment.on_changing(self.changing)
        probe(f"start mode={RoleEnvironment.get_setting('mode')}")
        return True

    def changing(self, event):
        names = [getattr(c, "name", "topology") for c in event.changes]
        probe("changing " + ",".join(names))
        if "mode" in names or "topology" in names:
            event.cancel()
"""


def test_a_settings_change_halts_in_the_first_domain_that_does_not_come_back(
    make_service: MakeService,
) -> None:
    """As a walk does: the next domain keeps its settings, and serves."""
    service = make_service(FRAGILE, instances=4, settings={"mode": "good", "most": 4},
                           service={"upgrade_domains": 2, "backoff_initial": "0.1s"})
    with service.harness() as h:
        h.wait_ready(30)
        pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
        done = subprocess.run(
            [sys.executable, "-m", "rolehost", "config", "set", "web", "mode=bad",
             "--run-dir", str(h.run_dir.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert done.stderr.startswith(
            "rolehost: config web halted in update domain 0: not offered to web_IN_1, "
            "web_IN_3, which keep what they had\n"), done.stderr
        for i in (0, 2):
            assert (f"web_IN_{i}: failed: web_IN_{i} did not become ready after recycle"
                    in done.stderr)
        for i in (1, 3):
            row = h.instance(f"web/{i}")
            assert (row["state"], row["pid"]) == ("ready", pids[f"web_IN_{i}"])
            assert f"changing mode web_IN_{i}" not in service.probes()
        [record] = h.operations()
        assert record["outcome"] == "failed"
        assert record["error"].startswith("config web halted in update domain 0")
        # The role kept the settings the halted change did not give every instance: the
        # next change is offered against them, and puts UD 0 back on them.
        assert h.client.configure("web", {"other": 1}) == {
            "web_IN_0": "applied at the next start", "web_IN_2": "applied at the next start",
            "web_IN_1": "applied", "web_IN_3": "applied"}
        assert "changing other web_IN_1" in service.probes()
        h.wait_ready(30)
        service.wait_probe("start mode=good web_IN_0")


def test_a_topology_change_goes_per_domain_and_halts_like_a_settings_change(
    make_service: MakeService,
) -> None:
    """Handlers that cancel recycle their instances: all at once, the role is down. The
    scale answers once the new instance, which never starts either, misses its ready
    deadline."""
    service = make_service(FRAGILE, instances=4, settings={"mode": "good", "most": 4},
                           service={"upgrade_domains": 2, "backoff_initial": "0.1s",
                                    "ready_deadline": "3s"})
    with service.harness() as h:
        h.wait_ready(30)
        pids = {i["id"]: i["pid"] for i in h.status()["instances"]}
        with pytest.raises(ApiError) as failed:
            h.client.scale("web", 5)
        assert failed.value.status == 500
        assert str(failed.value).startswith(
            "topology change of web (scaled to 5) halted in update domain 0: not offered to "
            "web_IN_1, web_IN_3, which keep what they had"), failed.value
        assert "web_IN_0: failed: web_IN_0 did not become ready after recycle" in str(
            failed.value)
        assert ("web_IN_4 did not become ready after it was added: it is failed (waiting for "
                "host: not ready within the ready deadline (3s)") in str(failed.value)
        for i in (1, 3):
            row = h.instance(f"web/{i}")
            assert (row["state"], row["pid"]) == ("ready", pids[f"web_IN_{i}"])
            assert f"changing topology web_IN_{i}" not in service.probes()
        assert [i["id"] for i in h.status()["instances"]][-1] == "web_IN_4"
        [record] = h.operations()
        assert (record["kind"], record["outcome"]) == ("scale web", "failed")


def test_a_host_that_dies_in_changing_recycles_once_with_the_new_settings(
    make_service: MakeService,
) -> None:
    """Its exit is its answer: no wait for the 30 s of a host that does not answer, and
    no second recycle after the one its crash began."""
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_changing(self.changing)
                probe(f"start color={RoleEnvironment.get_setting('color')}")
                return True

            def changing(self, event):
                probe("changing")
                os._exit(3)
        """,
        instances=2, settings={"color": "blue"},
        service={"upgrade_domains": 2, "backoff_initial": "0.1s"})
    with service.harness() as h:
        h.wait_ready(30)
        began = time.monotonic()
        assert h.set_setting("web", "color", "red") == {
            "web_IN_0": "recycled (its host exited in `changing`)",
            "web_IN_1": "recycled (its host exited in `changing`)"}
        assert time.monotonic() - began < 15  # two domains, each well under the 30 s
        for i in (0, 1):
            row = h.instance(f"web/{i}")
            assert (row["state"], row["restarts"]) == ("ready", 1), row
            assert row["last_error"] == "host exited with 3"
            assert service.probes().count(f"start color=red web_IN_{i}") == 1
        [record] = h.operations()
        assert record["outcome"] == "succeeded"
