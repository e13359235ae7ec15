"""`rolehost export kubernetes`: every manifest valid against the Kubernetes schemas
(offline, strict), the definition mapped field by field, and the container's own command
line and preStop hook run for real."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rolehost.definition import Role, parse
from rolehost.export import kubernetes
from rolehost.testing import wait_until
from support.net import answer, free_port
from support.processes import end_run_dir

KUBERNETES = "1.37.0"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

APP = '''
import json
from rolehost import RoleEntryPoint, RoleEnvironment

class Role(RoleEntryPoint):
    def on_start(self):
        seen = {name: RoleEnvironment.get_setting(name) for name in ("mode", "api-key")}
        seen["data"] = str(RoleEnvironment.local_resource("data").path)
        with open(RoleEnvironment.get_setting("probe"), "w") as out:
            json.dump(seen, out)
        return True
'''

DEFINITION = '''
[service]
name = "Shop_Front"
upgrade_domains = 3
ready_deadline = "10m"

# plain: an http endpoint, update domains
[roles.web_api]
entry_point = "app:Role"
instances = 5
stop_timeout = "20s"
status_check_interval = "3s"

[roles.web_api.endpoints.http]
port = 18080
drain_timeout = "4s"

[roles.web_api.internal_endpoints.peer_rpc]
port = 17000

[roles.web_api.settings]
greeting = "hi"
workers = 4
debug = true

# a persistent local resource and a secret setting: a StatefulSet
[roles.store]
entry_point = "app:Role"
instances = 2
stop_timeout = "1m"

[roles.store.endpoints.Admin_Port]
port = 19090
protocol = "tcp"
drain_timeout = "1s"

[roles.store.local_resources.data]
size_mb = 512
clean_on_recycle = false

[roles.store.local_resources.scratch]
size_mb = 64

[roles.store.settings]
probe = "{probe}"
mode = "fast"
api-key = {{ value = "s3cr3t-value", secret = true }}
'''


def export(tmp_path: Path, definition: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "rolehost.toml").write_text(definition)
    return subprocess.run(
        [sys.executable, "-m", "rolehost", "export", "kubernetes", "-f",
         str(tmp_path / "rolehost.toml"), "-o", str(tmp_path / "out"), *args],
        capture_output=True, text=True, timeout=60)


@pytest.fixture
def exported(tmp_path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest written, by (kind, name), each validated against the schemas."""
    done = export(tmp_path, DEFINITION.format(probe=tmp_path / "probe.json"),
                  "--image", "registry.example/shop:1.2")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["shop-front-store-secret.yaml", "shop-front-store.yaml",
                                       "shop-front-web-api.yaml"]
    assert done.stdout.splitlines() == [f"wrote {out / 'shop-front-web-api.yaml'}",
                                        f"wrote {out / 'shop-front-store.yaml'}",
                                        f"wrote {out / 'shop-front-store-secret.yaml'}"]
    assert stat.S_IMODE(os.stat(out / "shop-front-store-secret.yaml").st_mode) == 0o600
    found = {}
    for file in files:
        for manifest in yaml.safe_load_all(file.read_text()):
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
            found[manifest["kind"], manifest["metadata"]["name"]] = manifest
    return found


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_every_manifest_is_valid_and_every_name_a_dns_label(
    exported: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert sorted(exported) == [
        ("ConfigMap", "shop-front-store-settings"), ("ConfigMap", "shop-front-web-api-settings"),
        ("Deployment", "shop-front-web-api"),
        ("PodDisruptionBudget", "shop-front-store"), ("PodDisruptionBudget", "shop-front-web-api"),
        ("Secret", "shop-front-store-secrets"),
        ("Service", "shop-front-store-admin-port"), ("Service", "shop-front-web-api-http"),
        ("Service", "shop-front-web-api-peer-rpc"), ("StatefulSet", "shop-front-store"),
    ]
    names = [name for _, name in exported]
    for workload in (exported["Deployment", "shop-front-web-api"],
                     exported["StatefulSet", "shop-front-store"]):
        names += [c["name"] for c in pod(workload)["containers"]]
        names += [v["name"] for v in pod(workload)["volumes"]]
        names += list(workload["metadata"]["labels"].values())
    names += [p["name"] for kind, _ in exported if kind == "Service"
              for p in exported[kind, _]["spec"]["ports"]]
    for name in names:
        assert DNS_LABEL.match(name) and len(name) <= 63, name


def test_deployment_maps_instances_walks_probes_and_the_stop(
    exported: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = exported["Deployment", "shop-front-web-api"]
    spec = deployment["spec"]
    assert spec["replicas"] == 5
    # One update domain's worth at a time, in place: ceil(5 / 3) down, none added.
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxUnavailable": 2, "maxSurge": 0}}
    assert spec["progressDeadlineSeconds"] == 600 + kubernetes.MARGIN
    labels = spec["template"]["metadata"]["labels"]
    assert labels == deployment["metadata"]["labels"] == {
        "app.kubernetes.io/name": "shop-front-web-api", "app.kubernetes.io/part-of": "shop-front",
        "app.kubernetes.io/component": "web-api", "app.kubernetes.io/managed-by": "rolehost"}
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod(deployment)["containers"]
    assert container["image"] == "registry.example/shop:1.2"
    assert container["command"] == [
        "rolehost", "run-instance", "web_api", "-f", "/app/rolehost.toml",
        "--health", "0.0.0.0:8484", "--endpoint-host", "0.0.0.0",
        "--run-dir", "/var/lib/rolehost/run", "--drain-delay", "4"]
    assert container["env"] == [{"name": "ROLEHOST_INDEX", "value": "0"}]
    assert container["ports"] == [{"name": "health", "containerPort": 8484, "protocol": "TCP"},
                                  {"containerPort": 18080, "protocol": "TCP"},
                                  {"containerPort": 17000, "protocol": "TCP"}]
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/startup", "port": "health"}
    # the ready deadline, after the probe sent as the container starts
    assert startup["periodSeconds"] * (startup["failureThreshold"] - 1) == 600
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["periodSeconds"] == 3  # status_check_interval
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert stop[:2] == ["python3", "-c"]
    assert "http://127.0.0.1:8484/stop" in stop[2] and stop[2].endswith("time.sleep(4)")
    # The drain (the endpoint's drain_timeout), then stop_timeout, then a margin.
    assert pod(deployment)["terminationGracePeriodSeconds"] == 4 + 20 + kubernetes.MARGIN
    assert pod(deployment)["topologySpreadConstraints"] == [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": spec["selector"]["matchLabels"]}}]
    assert pod(deployment)["volumes"] == [{"name": "rolehost", "emptyDir": {}}]
    assert container["volumeMounts"] == [{"name": "rolehost", "mountPath": "/var/lib/rolehost"}]
    budget = exported["PodDisruptionBudget", "shop-front-web-api"]["spec"]
    assert budget == {"maxUnavailable": 2, "selector": spec["selector"]}


def test_statefulset_for_persistent_resources(
    exported: dict[tuple[str, str], dict[str, Any]],
) -> None:
    statefulset = exported["StatefulSet", "shop-front-store"]
    spec = statefulset["spec"]
    assert spec["replicas"] == 2 and spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate",
                                      "rollingUpdate": {"maxUnavailable": 1}}  # ceil(2 / 3)
    assert spec["volumeClaimTemplates"] == [{
        "metadata": {"name": "resource-data"},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "512Mi"}}}}]
    (container,) = pod(statefulset)["containers"]
    assert container["command"][-4:] == ["--drain-delay", "1",
                                         "--resources-dir", "/var/lib/rolehost/resources"]
    assert "env" not in container  # the index is the pod's ordinal, from its host name
    assert container["volumeMounts"] == [
        {"name": "rolehost", "mountPath": "/var/lib/rolehost"},
        {"name": "resources", "mountPath": "/var/lib/rolehost/resources"},
        {"name": "resource-data", "mountPath": "/var/lib/rolehost/resources/data"}]
    assert pod(statefulset)["volumes"] == [
        {"name": "rolehost", "emptyDir": {}},
        {"name": "resources", "emptyDir": {"sizeLimit": "64Mi"}}]  # clean_on_recycle ones
    assert pod(statefulset)["terminationGracePeriodSeconds"] == 1 + 60 + kubernetes.MARGIN
    assert container["envFrom"] == [{"configMapRef": {"name": "shop-front-store-settings"}},
                                    {"secretRef": {"name": "shop-front-store-secrets"}}]
    assert exported["PodDisruptionBudget", "shop-front-store"]["spec"]["maxUnavailable"] == 1


def test_settings_and_services(exported: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert exported["ConfigMap", "shop-front-web-api-settings"]["data"] == {
        "ROLEHOST_SETTING_GREETING": "hi", "ROLEHOST_SETTING_WORKERS": "4",
        "ROLEHOST_SETTING_DEBUG": "true"}
    config = exported["ConfigMap", "shop-front-store-settings"]["data"]
    assert set(config) == {"ROLEHOST_SETTING_PROBE", "ROLEHOST_SETTING_MODE"}
    assert "s3cr3t-value" not in yaml.safe_dump(config)
    secret = exported["Secret", "shop-front-store-secrets"]
    assert secret["type"] == "Opaque"
    assert secret["stringData"] == {"ROLEHOST_SETTING_API_KEY": "s3cr3t-value"}
    http = exported["Service", "shop-front-web-api-http"]["spec"]
    assert http["selector"] == exported["Deployment", "shop-front-web-api"]["spec"]["selector"][
        "matchLabels"]
    assert http["ports"] == [{"name": "http", "protocol": "TCP", "port": 18080,
                              "targetPort": 18080, "appProtocol": "http"}]
    # An internal endpoint: a headless Service, whose name resolves to each ready pod.
    rpc = exported["Service", "shop-front-web-api-peer-rpc"]["spec"]
    assert rpc == {"clusterIP": "None", "selector": http["selector"],
                   "ports": [{"name": "peer-rpc", "protocol": "TCP", "port": 17000,
                              "targetPort": 17000}]}
    admin = exported["Service", "shop-front-store-admin-port"]["spec"]
    assert admin["ports"] == [{"name": "admin-port", "protocol": "TCP", "port": 19090,
                               "targetPort": 19090}]


def _read_as_other_than_a_string(text: str) -> bool:
    """Would a YAML 1.2 parser (Kubernetes') read this plain scalar as a number, a bool or
    null? Python's own parsers, looser than YAML 1.2: a check, not the dumper's rule."""
    if text.lower() in ("", "~", "null", "true", "false"):
        return True
    for read in (lambda t: int(t, 0), float):
        try:
            read(text.replace("_", ""))
            return True
        except ValueError:
            pass
    return False


def test_strings_stay_strings_for_a_yaml_1_2_parser(tmp_path: Path) -> None:
    settings = {"exp": "1e5", "octal": "0o17", "hex": "0x1F", "big": 1e20, "half": ".5",
                "word": "on", "plain": "hello", "count": 4, "flag": True}
    raw = {"service": {"name": "s"}, "roles": {"web": {
        "entry_point": "app:Role", "settings": {**settings,
                                                 "key": {"value": "1e5", "secret": True}}}}}
    files = kubernetes.write(parse(raw), tmp_path)
    for file in files:
        for document in yaml.compose_all(file.read_text()):
            data = {key.value: value for key, value in document.value
                    if key.value in ("data", "stringData")}
            for part in data.values():
                for _, value in part.value:  # ConfigMap and Secret data: strings, quoted
                    assert value.style == '"', (file.name, value.value)
            nodes = [document]
            while nodes:
                node = nodes.pop()
                if isinstance(node, yaml.ScalarNode):
                    if node.tag == "tag:yaml.org,2002:str" and node.style is None:
                        assert not _read_as_other_than_a_string(node.value), node.value
                elif isinstance(node, yaml.MappingNode):
                    nodes += [n for pair in node.value for n in pair]
                else:
                    nodes += node.value
    [config, *_] = yaml.safe_load_all(files[0].read_text())
    assert config["data"] == {
        "ROLEHOST_SETTING_EXP": "1e5", "ROLEHOST_SETTING_OCTAL": "0o17",
        "ROLEHOST_SETTING_HEX": "0x1F", "ROLEHOST_SETTING_BIG": "1e+20",
        "ROLEHOST_SETTING_HALF": ".5", "ROLEHOST_SETTING_WORD": "on",
        "ROLEHOST_SETTING_PLAIN": "hello", "ROLEHOST_SETTING_COUNT": "4",
        "ROLEHOST_SETTING_FLAG": "true"}


def test_names_are_sanitised_and_cut_uniquely() -> None:
    assert kubernetes.dns_name("Shop_Front", "web__API-") == "shop-front-web-api"
    long_a, long_b = kubernetes.dns_name("s", "x" * 80 + "a"), kubernetes.dns_name("s", "x" * 80)
    assert len(long_a) == 63 and long_a != long_b and DNS_LABEL.match(long_a)
    assert len(kubernetes.dns_name("s", "y" * 80, limit=52)) == 52


def test_probe_arithmetic() -> None:
    # The first probe comes as the container starts: (threshold - 1) periods are its time.
    assert kubernetes.startup_timing(1800) == (10, 181)
    assert kubernetes.startup_timing(45.5) == (10, 6)  # rounded up to whole periods
    assert kubernetes.startup_timing(10) == (10, 2)  # not killed by the very first probe
    assert kubernetes.startup_timing(5) == (5, 2)
    assert kubernetes.startup_timing(0.2) == (1, 2)
    role = Role(entry_point="m:C", status_check_interval=3600)
    assert kubernetes.readiness_period(role) == 10


@pytest.mark.parametrize(("definition", "expected"), [
    ('[service]\nname = "s"\n[roles.web]\nentry_point = "app:Role"\ninstances = 0\n',
     "invalid definition:\n{toml}: roles.web.instances: expected greater than or equal to 1, "
     "got 0"),
    ('[service]\nname = "s"\n[roles.a_b]\nentry_point = "app:Role"\n'
     '[roles.a-b]\nentry_point = "app:Role"\n',
     "cannot export to Kubernetes:\n{toml}: roles.a-b: its Kubernetes name 's-a-b' is taken "
     "by roles.a_b"),
    ('[service]\nname = "s"\n[roles.web]\nentry_point = "app:Role"\n'
     '[roles.web.endpoints.http]\nport = 8484\n',
     "cannot export to Kubernetes:\n{toml}: roles.web.endpoints.http.port: port 8484 is "
     "taken by run-instance's health endpoints in the pod"),
    ('[service]\nname = "s"\n[roles.web]\nentry_point = "app:Role"\n'
     '[roles.web.internal_endpoints.rpc]\n',
     "cannot export to Kubernetes:\n{toml}: roles.web.internal_endpoints.rpc.port: expected "
     "a port: in Kubernetes every pod binds the same one, which its peers find by DNS"),
    ('[service]\nname = "s"\n[roles.web]\nentry_point = "app:Role"\n'
     '[roles.web.internal_endpoints.rpc]\nport = 8484\n',
     "cannot export to Kubernetes:\n{toml}: roles.web.internal_endpoints.rpc.port: port 8484 "
     "is taken by run-instance's health endpoints in the pod"),
    ('[service]\nname = "s"\n[roles.web]\nentry_point = "app:Role"\n'
     '[roles.web.settings]\n"log level" = "debug"\n',
     "cannot export to Kubernetes:\n{toml}: roles.web.settings.log level: cannot be passed "
     "as the environment variable ROLEHOST_SETTING_LOG LEVEL"),
])
def test_a_bad_definition_exits_2_and_writes_nothing(tmp_path: Path, definition: str,
                                                     expected: str) -> None:
    done = export(tmp_path, definition)
    assert done.returncode == 2
    assert done.stderr.strip() == "rolehost: " + expected.format(toml=tmp_path / "rolehost.toml")
    assert not (tmp_path / "out").exists()


def test_the_container_command_and_prestop_run_as_written(
    exported: dict[tuple[str, str], dict[str, Any]], tmp_path: Path,
) -> None:
    """The StatefulSet's command line and preStop hook, with local stand-ins for the
    image's paths and port, and the ConfigMap and Secret as its environment."""
    (container,) = pod(exported["StatefulSet", "shop-front-store"])["containers"]
    health, run_dir = free_port(), tmp_path / "run"
    local = {kubernetes.DEFINITION: str(tmp_path / "rolehost.toml"),
             f"0.0.0.0:{kubernetes.HEALTH_PORT}": f"127.0.0.1:{health}",
             kubernetes.RUN_DIR: str(run_dir),
             kubernetes.RESOURCES_DIR: str(tmp_path / "volumes")}
    command = container["command"]
    assert command[0] == "rolehost"
    argv = [sys.executable, "-m", "rolehost", *(local.get(arg, arg) for arg in command[1:])]
    env = {**os.environ, **exported["ConfigMap", "shop-front-store-settings"]["data"],
           **exported["Secret", "shop-front-store-secrets"]["stringData"],
           "ROLEHOST_SETTING_MODE": "from-the-configmap"}
    log = tmp_path / "instance.log"
    with log.open("wb") as output:
        instance = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answer(health, "/startup") == 200, 30, "/startup", log.read_text)
        wait_until(lambda: answer(health, "/ready") == 200, 30, "/ready", log.read_text)
        assert answer(health, "/live") == 200
        assert yaml.safe_load((tmp_path / "probe.json").read_text()) == {
            "mode": "from-the-configmap", "api-key": "s3cr3t-value",
            "data": str((tmp_path / "volumes" / "data").resolve())}
        stop = container["lifecycle"]["preStop"]["exec"]["command"]
        script = stop[2].replace(f":{kubernetes.HEALTH_PORT}/", f":{health}/")
        hook = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=30)
        assert hook.returncode == 0, hook.stderr
        assert instance.wait(30) == 0
    finally:
        if instance.poll() is None:
            instance.kill()
            instance.wait()
        end_run_dir(run_dir)


@pytest.mark.parametrize(("sample", "written"), [
    ("web", ["web-web.yaml"]), ("hello", ["hello-worker.yaml"]),  # docs/kubernetes.md's
    ("shop", ["shop-web.yaml", "shop-worker.yaml"])])
def test_the_samples_export(tmp_path: Path, sample: str, written: list[str]) -> None:
    toml = Path(__file__).parent.parent / "samples" / sample / "rolehost.toml"
    done = subprocess.run([sys.executable, "-m", "rolehost", "export", "kubernetes", "-f",
                           str(toml), "-o", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == written
    for file in tmp_path.iterdir():
        for manifest in yaml.safe_load_all(file.read_text()):
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
