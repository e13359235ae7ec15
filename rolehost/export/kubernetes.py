"""Kubernetes manifests for a service: `rolehost export kubernetes`.

Each role becomes a Deployment, or a StatefulSet when it has local resources with
`clean_on_recycle = false` (they live on PersistentVolumeClaims), whose pods run
`rolehost run-instance ROLE`; plus a PodDisruptionBudget, a Service per input endpoint
(headless per internal endpoint, for discovery by DNS), a
ConfigMap with its settings and a Secret with its secret ones. The functions below are
pure: definition in, manifest dicts out; `write` dumps them as YAML, one file per role
(and one more, private, for its Secret). docs/kubernetes.md gives the mapping key by key
and what does not carry over.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from rolehost.definition import (
    Definition,
    DefinitionError,
    Protocol,
    Role,
    SettingValue,
    setting_variable,
)

Manifest = dict[str, Any]

HEALTH_PORT = 8484  # run-instance's /startup, /ready, /live and /stop
DEFINITION = "/app/rolehost.toml"  # where the image holds the definition (and the apps beside it)
STATE = "/var/lib/rolehost"  # an emptyDir: lives as long as the pod, across container restarts
RUN_DIR = f"{STATE}/run"  # the run directory: os/, app/ and the logs of the instance
RESOURCES_DIR = f"{STATE}/resources"  # --resources-dir: one folder (or volume) per resource
STARTUP_PERIOD = 10  # seconds between startup probes
READINESS_PERIOD = 10  # at most, between readiness probes: a slow status check or not
MARGIN = 30  # seconds on top of rolehost's own deadlines before Kubernetes steps in
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label made of `parts`: lowercase, `-` for anything else, at most `limit`
    characters (a longer name is cut and ends with a hash of the whole, to stay unique).
    Every part of a definition name starts with a letter, so the label does too."""
    joined = "-".join(parts)
    name = re.sub(r"[^a-z0-9]+", "-", joined.lower()).strip("-")
    if len(name) > limit:
        digest = hashlib.sha256(joined.encode()).hexdigest()[:8]
        name = f"{name[:limit - 9].rstrip('-')}-{digest}"
    return name


def workload_name(definition: Definition, role_name: str) -> str:
    # 52: a StatefulSet labels its pods NAME-<10-character hash>, and a label value is 63.
    return dns_name(definition.service.name, role_name, limit=52)


def claim_name(resource: str) -> str:
    return dns_name("resource", resource)


def is_stateful(role: Role) -> bool:
    """Some local resource outlives a recycle: the role needs a StatefulSet's volumes."""
    return any(not spec.clean_on_recycle for spec in role.local_resources.values())


def max_unavailable(definition: Definition, role: Role) -> int:
    """One update domain's worth of instances: what a walk takes down at once."""
    return math.ceil(role.instances / definition.service.upgrade_domains)


def drain_delay(role: Role) -> int:
    """Seconds a stopping pod keeps serving after it leaves rotation, while the Services'
    endpoints catch up: the longest drain_timeout of its endpoints; none, no wait."""
    return math.ceil(max((e.drain_timeout for e in role.endpoints.values()), default=0))


def grace_period(role: Role) -> int:
    """terminationGracePeriodSeconds: the drain, then stopping handlers and on_stop."""
    return drain_delay(role) + math.ceil(role.stop_timeout) + MARGIN


def startup_timing(ready_deadline: float) -> tuple[int, int]:
    """(periodSeconds, failureThreshold) of the startup probe. The kubelet probes once as
    the container starts and then every period, so a container gets (threshold - 1)
    periods: that is the ready deadline, in whole seconds, rounded up to whole periods.
    One failure fewer, and a short deadline would fail the probe sent before the
    interpreter is even up."""
    seconds = max(1, math.ceil(ready_deadline))
    period = min(STARTUP_PERIOD, seconds)
    return period, math.ceil(seconds / period) + 1


def readiness_period(role: Role) -> int:
    """As often as the status checks run (probing faster learns nothing new), capped so
    a new pod is not kept out of rotation long."""
    return min(READINESS_PERIOD, max(1, math.ceil(role.status_check_interval)))


def selector(definition: Definition, role_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": workload_name(definition, role_name),
            "app.kubernetes.io/part-of": dns_name(definition.service.name)}


def labels(definition: Definition, role_name: str) -> dict[str, str]:
    return {**selector(definition, role_name),
            "app.kubernetes.io/component": dns_name(role_name),
            "app.kubernetes.io/managed-by": "rolehost"}


def _metadata(definition: Definition, role_name: str, name: str) -> Manifest:
    return {"name": name, "labels": labels(definition, role_name)}


def _text(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _settings(role: Role, secret: bool) -> dict[str, str]:
    return {setting_variable(name): _text(value) for name, value in role.values.items()
            if (name in role.secrets) == secret}


def config_map(definition: Definition, role_name: str) -> Manifest | None:
    """The role's settings that are not secret, as ROLEHOST_SETTING_NAME variables."""
    data = _settings(definition.roles[role_name], secret=False)
    if not data:
        return None
    name = dns_name(definition.service.name, role_name, "settings")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(definition, role_name, name), "data": data}


def secret(definition: Definition, role_name: str) -> Manifest | None:
    """The role's secret settings, as ROLEHOST_SETTING_NAME variables."""
    data = _settings(definition.roles[role_name], secret=True)
    if not data:
        return None
    name = dns_name(definition.service.name, role_name, "secrets")
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(definition, role_name, name), "stringData": data}


def container(definition: Definition, role_name: str, image: str) -> Manifest:
    role = definition.roles[role_name]
    drain = drain_delay(role)
    period, failures = startup_timing(definition.service.ready_deadline)
    command = ["rolehost", "run-instance", role_name, "-f", DEFINITION,
               "--health", f"0.0.0.0:{HEALTH_PORT}", "--endpoint-host", "0.0.0.0",
               "--run-dir", RUN_DIR, "--drain-delay", str(drain)]
    mounts = [{"name": "rolehost", "mountPath": STATE}]
    if role.local_resources:
        # The clean_on_recycle ones are folders of one emptyDir, not mounts of their own:
        # rolehost empties a resource by removing its folder, which a mount point refuses.
        # The others are claims, mounted in it; run-instance never empties them.
        command += ["--resources-dir", RESOURCES_DIR]
        if any(spec.clean_on_recycle for spec in role.local_resources.values()):
            mounts.append({"name": "resources", "mountPath": RESOURCES_DIR})
        mounts += [{"name": claim_name(name), "mountPath": f"{RESOURCES_DIR}/{name}"}
                   for name, spec in role.local_resources.items() if not spec.clean_on_recycle]
    # The stop begins at once (out of rotation); the pod gets SIGTERM after the drain.
    stop = (f"import time, urllib.request as r; r.urlopen(r.Request('http://127.0.0.1:"
            f"{HEALTH_PORT}/stop', method='POST'), timeout=5); time.sleep({drain})")
    spec: Manifest = {"name": dns_name(role_name), "image": image, "command": command}
    if not is_stateful(role):  # a StatefulSet pod's index is its ordinal, from its host name
        spec["env"] = [{"name": "ROLEHOST_INDEX", "value": "0"}]
    env_from = []
    if (settings := config_map(definition, role_name)) is not None:
        env_from.append({"configMapRef": {"name": settings["metadata"]["name"]}})
    if (hidden := secret(definition, role_name)) is not None:
        env_from.append({"secretRef": {"name": hidden["metadata"]["name"]}})
    if env_from:
        spec["envFrom"] = env_from
    spec["ports"] = [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                     *({"containerPort": ep.port, "protocol": "TCP"}
                       for ep in role.endpoints.values()),
                     *({"containerPort": ep.port, "protocol": "TCP"}
                       for ep in role.internal_endpoints.values() if ep.port is not None)]
    spec["startupProbe"] = {"httpGet": {"path": "/startup", "port": "health"},
                            "periodSeconds": period, "failureThreshold": failures}
    spec["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "health"},
                              "periodSeconds": readiness_period(role),
                              "failureThreshold": 1}
    spec["livenessProbe"] = {"httpGet": {"path": "/live", "port": "health"},
                             "periodSeconds": 10, "failureThreshold": 3}
    spec["lifecycle"] = {"preStop": {"exec": {"command": ["python3", "-c", stop]}}}
    spec["volumeMounts"] = mounts
    return spec


def pod_template(definition: Definition, role_name: str, image: str) -> Manifest:
    role = definition.roles[role_name]
    volumes: list[Manifest] = [{"name": "rolehost", "emptyDir": {}}]
    scratch = sum(s.size_mb for s in role.local_resources.values() if s.clean_on_recycle)
    if scratch:
        volumes.append({"name": "resources", "emptyDir": {"sizeLimit": f"{scratch}Mi"}})
    return {
        "metadata": {"labels": labels(definition, role_name)},
        "spec": {
            "containers": [container(definition, role_name, image)],
            "terminationGracePeriodSeconds": grace_period(role),
            "topologySpreadConstraints": [{
                "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector(definition, role_name)},
            }],
            "volumes": volumes,
        },
    }


def workload(definition: Definition, role_name: str, image: str) -> Manifest:
    """The Deployment, or the StatefulSet, that runs the role's instances."""
    role = definition.roles[role_name]
    bound = max_unavailable(definition, role)
    spec: Manifest = {"replicas": role.instances,
                      "selector": {"matchLabels": selector(definition, role_name)}}
    if is_stateful(role):
        kind = "StatefulSet"
        spec["podManagementPolicy"] = "Parallel"  # instances start together, as under rolehost
        spec["updateStrategy"] = {"type": "RollingUpdate",
                                  "rollingUpdate": {"maxUnavailable": bound}}
        spec["volumeClaimTemplates"] = [
            {"metadata": {"name": claim_name(name)},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": f"{resource.size_mb}Mi"}}}}
            for name, resource in role.local_resources.items() if not resource.clean_on_recycle
        ]
    else:
        kind = "Deployment"
        spec["strategy"] = {"type": "RollingUpdate",
                            "rollingUpdate": {"maxUnavailable": bound, "maxSurge": 0}}
        spec["progressDeadlineSeconds"] = math.ceil(definition.service.ready_deadline) + MARGIN
    spec["template"] = pod_template(definition, role_name, image)
    name = workload_name(definition, role_name)
    return {"apiVersion": "apps/v1", "kind": kind,
            "metadata": _metadata(definition, role_name, name), "spec": spec}


def disruption_budget(definition: Definition, role_name: str) -> Manifest:
    """Drains and evictions, too, take at most one update domain's worth at a time."""
    name = workload_name(definition, role_name)
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _metadata(definition, role_name, name),
            "spec": {"maxUnavailable": max_unavailable(definition, definition.roles[role_name]),
                     "selector": {"matchLabels": selector(definition, role_name)}}}


def services(definition: Definition, role_name: str) -> list[Manifest]:
    """A Service per input endpoint: its port, to the same port of the role's ready pods.
    A headless one per internal endpoint: its DNS name resolves to the address of each
    ready pod, which peers connect to on the endpoint's port (no balancing, as under
    rolehost)."""
    role = definition.roles[role_name]
    found = []
    for endpoint_name, address in role.addresses().items():
        if endpoint_name in role.endpoints:
            number: int | None = role.endpoints[endpoint_name].port
            kind = {"type": "ClusterIP"}
        elif endpoint_name in role.internal_endpoints:
            number = role.internal_endpoints[endpoint_name].port
            kind = {"clusterIP": "None"}
        else:
            continue  # an instance endpoint: one pod at a time (docs/kubernetes.md)
        port: Manifest = {"name": dns_name(endpoint_name), "protocol": "TCP",
                          "port": number, "targetPort": number}
        # An https endpoint's pods speak http: TLS is the Ingress's in front.
        if address[1] == Protocol.http.value:
            port["appProtocol"] = "http"
        name = dns_name(definition.service.name, role_name, endpoint_name)
        found.append({"apiVersion": "v1", "kind": "Service",
                      "metadata": _metadata(definition, role_name, name),
                      "spec": {**kind, "selector": selector(definition, role_name),
                               "ports": [port]}})
    return found


def check(definition: Definition) -> None:
    """Raise DefinitionError for what a definition may say but these manifests cannot."""
    workloads: dict[str, str] = {}
    endpoints: dict[str, str] = {}
    for role_name, role in definition.roles.items():
        where = f"roles.{role_name}"
        _claim(workloads, workload_name(definition, role_name), where)
        ports = {HEALTH_PORT: "run-instance's health endpoints"}
        declared = {f"{where}.endpoints.{name}": ep.port for name, ep in role.endpoints.items()}
        for name, internal in role.internal_endpoints.items():
            if internal.port is None:
                raise DefinitionError(None, f"{where}.internal_endpoints.{name}.port",
                                      "expected a port: in Kubernetes every pod binds the "
                                      "same one, which its peers find by DNS")
            declared[f"{where}.internal_endpoints.{name}"] = internal.port
        for path, number in declared.items():
            endpoint_name = path.rpartition(".")[2]
            _claim(endpoints, dns_name(definition.service.name, role_name, endpoint_name), path)
            if (other := ports.setdefault(number, path)) != path:
                raise DefinitionError(None, f"{path}.port",
                                      f"port {number} is taken by {other} in the pod")
        volumes: dict[str, str] = {}
        for name in role.local_resources:
            _claim(volumes, claim_name(name), f"{where}.local_resources.{name}")
        for name in role.settings:
            if not _ENV_NAME.match(setting_variable(name)):
                raise DefinitionError(None, f"{where}.settings.{name}", "cannot be passed as "
                                      f"the environment variable {setting_variable(name)}")


def _claim(taken: dict[str, str], name: str, path: str) -> None:
    if (other := taken.setdefault(name, path)) != path:
        raise DefinitionError(None, path, f"its Kubernetes name {name!r} is taken by {other}")


def manifests(definition: Definition, image: str | None = None) -> dict[str, list[Manifest]]:
    """Every manifest, by role. `image` holds the apps, the definition at DEFINITION, and
    rolehost [default: SERVICE:latest]."""
    check(definition)
    image = image or f"{dns_name(definition.service.name)}:latest"
    found: dict[str, list[Manifest]] = {}
    for role_name in definition.roles:
        documents = [config_map(definition, role_name), secret(definition, role_name),
                     workload(definition, role_name, image),
                     disruption_budget(definition, role_name), *services(definition, role_name)]
        found[role_name] = [d for d in documents if d is not None]
    return found


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # spell equal label maps out, not as &anchors


class _Quoted(str):
    """A string written in quotes, whatever it holds."""


# Plain scalars that YAML 1.2 (the Kubernetes parser's) reads as numbers, booleans or null
# while PyYAML, a YAML 1.1 dumper, sees strings and leaves them plain: "1e5", "0o17".
_NOT_A_STRING_IN_YAML_1_2 = re.compile(
    r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
    r"|[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
    r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
    r"|null|Null|NULL|~|true|True|TRUE|false|False|FALSE|"
)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    quoted = isinstance(data, _Quoted) or _NOT_A_STRING_IN_YAML_1_2.fullmatch(data)
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"' if quoted else None)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_Quoted, _represent_str)


def _quote_data(document: Manifest) -> Manifest:
    """A ConfigMap's data and a Secret's stringData must be strings, whatever they look
    like to whichever parser: every value in quotes."""
    return {key: {name: _Quoted(value) for name, value in part.items()}
            if key in ("data", "stringData") else part for key, part in document.items()}


def write(definition: Definition, output: Path, image: str | None = None) -> list[Path]:
    """Write NAME.yaml per role, and NAME-secret.yaml (mode 0600) for its Secret: it can
    stay out of version control, or be made another way. Nothing is written if the
    definition cannot be exported."""
    every = manifests(definition, image)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for role_name, documents in every.items():
        stem = output / workload_name(definition, role_name)
        written.append(_dump(stem.with_name(f"{stem.name}.yaml"),
                             [d for d in documents if d["kind"] != "Secret"]))
        if secrets := [d for d in documents if d["kind"] == "Secret"]:
            written.append(_dump(stem.with_name(f"{stem.name}-secret.yaml"), secrets, True))
    return written


def _dump(path: Path, documents: list[Manifest], private: bool = False) -> Path:
    text = yaml.dump_all([_quote_data(d) for d in documents], Dumper=_Dumper, sort_keys=False,
                         width=1000)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    if private:
        os.fchmod(descriptor, 0o600)  # before the values go in: the file may be older, looser
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write("# Written by `rolehost export kubernetes`; docs/kubernetes.md explains it.\n")
        out.write(text)
    return path
