"""`rolehost import azure`: a Cloud Services package's ServiceDefinition.csdef and
ServiceConfiguration.cscfg, translated into the document of a rolehost.toml.

What the package states and rolehost can express is translated, key by key (the table in
docs/azure.md); what it cannot is a `Gap` that names the element's XML path and what the
user must do. Nothing is dropped in silence. The files come from elsewhere: they are read
with defusedxml, which refuses a DTD (and with it entity expansion and external
entities) rather than resolving it, and never more than `MAX_BYTES` of them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

MAX_BYTES = 4 * 1024 * 1024  # the platform's largest packages define a few hundred KB
ROLE_KINDS = ("WebRole", "WorkerRole")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
WINDOWS_COMMAND = re.compile(r"\.(cmd|bat|exe|ps1)\b|\\|%\w+%", re.IGNORECASE)
# A value under one of these names is kept out of status, events and logs: a secret shown
# by mistake costs more than one hidden by mistake, and the comment says how to undo it.
SECRET_NAME = re.compile(r"password|secret|connectionstring|accountkey|token|apikey|sas",
                         re.IGNORECASE)
PLUGIN_SETTING = "Microsoft.WindowsAzure.Plugins."
PROBE_INTERVAL, PROBE_TIMEOUT = 15, 31  # the platform's defaults, in seconds


class Refused(ValueError):
    """A file that is not a Cloud Services file rolehost can read, or is hostile."""


@dataclass(frozen=True)
class Gap:
    """An element or attribute of the package that rolehost cannot express."""

    path: str  # its XML path, in the file named first
    message: str  # what rolehost does instead, and what the user must do

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Translation:
    document: dict[str, Any]
    comments: dict[tuple[str, ...], str] = field(default_factory=dict)  # key path: note
    gaps: list[Gap] = field(default_factory=list)


def read(path: Path, root: str) -> Element:
    """The root element of `path`, which must be a `root` document; `Refused` otherwise."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise Refused(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise Refused(f"{path}: refused: larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        element: Element = safe_xml.fromstring(data, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise Refused(f"{path}: refused: {exc} (a DTD, an entity or an external "
                      "reference has no place in a Cloud Services file)") from None
    except ParseError as exc:
        raise Refused(f"{path}: not well-formed XML: {exc}") from None
    if _tag(element) != root:
        raise Refused(f"{path}: expected a <{root}> document, found <{_tag(element)}>")
    return element


def translate(definition: Element, configuration: Element) -> Translation:
    """The rolehost document of a ServiceDefinition and its ServiceConfiguration."""
    return _Translator(definition, configuration).run()


def _tag(element: Element) -> str:
    return element.tag.rpartition("}")[2]  # without the schema's namespace


def _children(element: Element, tag: str) -> Iterator[Element]:
    return (child for child in element if _tag(child) == tag)


def _child(element: Element, tag: str) -> Element | None:
    return next(_children(element, tag), None)


def _path(parent: str, element: Element) -> str:
    name = element.get("name")
    return f"{parent}/{_tag(element)}" + (f"[@name='{name}']" if name is not None else "")


def _integer(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().isdigit() else None


def _seconds(value: int) -> str:
    return f"{value // 60}m" if value % 60 == 0 and value >= 60 else f"{value}s"


class _Translator:
    def __init__(self, definition: Element, configuration: Element) -> None:
        self.definition = definition
        self.configuration = configuration
        self.out = Translation(document={})
        self.probes: dict[str, tuple[str, Element]] = {}  # name: (path, element)
        self.probes_used: set[str] = set()

    def gap(self, path: str, message: str) -> None:
        self.out.gaps.append(Gap(path, message))

    def note(self, keys: tuple[str, ...], comment: str) -> None:
        self.out.comments[keys] = comment

    def name(self, path: str, given: str | None, what: str) -> str:
        """A rolehost name for `given`: the same where it is one, made one where not."""
        given = given or what
        if NAME.fullmatch(given):
            return given
        made = re.sub(r"[^A-Za-z0-9_-]", "-", given).strip("-") or what
        made = (made if made[0].isalpha() else f"{what}-{made}")[:63]
        self.gap(path, f"{given!r} is not a rolehost name (a letter, then letters, digits, "
                       f"'_' or '-'): named {made!r}")
        return made

    def run(self) -> Translation:
        top = f"/{_tag(self.definition)}"
        service: dict[str, Any] = {"name": self.name(top, self.definition.get("name"),
                                                     "service")}
        domains = _integer(self.definition.get("upgradeDomainCount"))
        if domains is not None:
            if 1 <= domains <= 20:
                service["upgrade_domains"] = domains
            else:
                self.gap(f"{top}/@upgradeDomainCount", f"{domains} update domains: rolehost "
                         "takes 1 to 20; the default, 5, is used")
        for attribute in ("topologyChangeDiscovery",):
            if self.definition.get(attribute) is not None:
                self.gap(f"{top}/@{attribute}", "rolehost raises the topology events "
                         "(`changing`, `changed`) to every instance at once: nothing to set")
        self.out.document["service"] = service
        self._read_probes(top)
        configured = self._configured_roles()
        roles: dict[str, Any] = {}
        for element in self.definition:
            kind = _tag(element)
            path = _path(top, element)
            if kind in ROLE_KINDS:
                name = self.name(path, element.get("name"), "role")
                roles[name] = self._role(path, name, element,
                                         configured.pop(element.get("name") or "", None))
            elif kind != "LoadBalancerProbes":
                self.gap(path, "not translated: rolehost has no equivalent")
        self.out.document["roles"] = roles
        for name in configured:
            self.gap(f"/{_tag(self.configuration)}/Role[@name='{name}']",
                     "configures a role the definition does not declare: ignored")
        for name, (path, _) in self.probes.items():
            if name not in self.probes_used:
                self.gap(path, "no input endpoint names this probe: not translated")
        self._configuration_gaps()
        return self.out

    def _configured_roles(self) -> dict[str, Element]:
        return {role.get("name") or "": role for role in _children(self.configuration, "Role")}

    def _configuration_gaps(self) -> None:
        top = f"/{_tag(self.configuration)}"
        for attribute, message in (
                ("osFamily", "the guest OS is this machine's: rehearse its upgrades with "
                             "`rolehost upgrade guest-os`"),
                ("osVersion", "the guest OS is this machine's: rehearse its upgrades with "
                              "`rolehost upgrade guest-os`")):
            if self.configuration.get(attribute) is not None:
                self.gap(f"{top}/@{attribute}", message)
        for element in self.configuration:
            if _tag(element) != "Role":
                self.gap(_path(top, element), "not translated: rolehost has no equivalent")

    def _read_probes(self, top: str) -> None:
        for group in _children(self.definition, "LoadBalancerProbes"):
            for probe in _children(group, "LoadBalancerProbe"):
                path = _path(f"{top}/LoadBalancerProbes", probe)
                self.probes[probe.get("name") or ""] = (path, probe)

    def _role(self, path: str, name: str, element: Element,
              configured: Element | None) -> dict[str, Any]:
        keys = ("roles", name)
        module = re.sub(r"[^a-z0-9_]", "_", name.lower())
        if not module[0].isalpha():
            module = f"role_{module}"
        role: dict[str, Any] = {"entry_point": f"{module}:{name.replace('-', '_')}"}
        entry = self._entry_point(element)
        self.note((*keys, "entry_point"), "fill in: the module:Class of the role's "
                  f"RoleEntryPoint, in place of {entry}")
        self.gap(path, f"fill in entry_point: the role's RoleEntryPoint in Python ({entry} "
                       "does not run here)")
        cscfg = f"/{_tag(self.configuration)}/Role[@name='{element.get('name')}']"
        if configured is None:
            self.gap(cscfg, "the configuration has no such role: 1 instance, and no "
                            "setting valued")
        else:
            count = _integer(_child_attr(configured, "Instances", "count"))
            if count is not None and 1 <= count <= 1000:
                role["instances"] = count
            else:
                self.gap(f"{cscfg}/Instances/@count", "expected 1 to 1000 instances: 1 is used")
        for attribute in ("vmsize", "enableNativeCodeExecution"):
            if element.get(attribute) is not None:
                self.gap(f"{path}/@{attribute}", "an instance is a process on this machine: "
                         "nothing to size")
        certificates = self._certificates(configured)
        used: set[str] = set()
        for child in element:
            tag, at = _tag(child), _path(path, child)
            if tag == "ConfigurationSettings":
                role["settings"] = self._settings(at, keys, child, configured)
            elif tag == "Endpoints":
                self._endpoints(at, keys, child, role, certificates, used)
            elif tag == "LocalResources":
                role["local_resources"] = self._local_resources(at, child)
            elif tag == "Startup":
                role["startup_tasks"] = self._startup(at, child)
            elif tag == "Certificates":
                continue  # after the endpoints, which say which of them serve https
            elif tag == "Runtime":
                self._runtime(at, child)
            elif tag == "Sites":
                self.gap(at, "rolehost runs no IIS: the role serves its site itself, on "
                             "the private port of its endpoint")
            elif tag == "Imports":
                for module_element in _children(child, "Import"):
                    self.gap(f"{at}/Import[@moduleName='{module_element.get('moduleName')}']",
                             "a platform module (remote access, diagnostics): not translated")
            else:
                self.gap(at, "not translated: rolehost has no equivalent")
        for declared in _children(_child(element, "Certificates") or Element("none"),
                                  "Certificate"):
            if declared.get("name") not in used:
                self.gap(_path(f"{path}/Certificates", declared),
                         "a certificate for the role's own use: there is no certificate "
                         "store; ship the file with the app, its password as a secret setting")
        return {key: value for key, value in role.items() if value not in ({}, [])}

    def _entry_point(self, element: Element) -> str:
        runtime = _child(element, "Runtime")
        entry = _child(runtime, "EntryPoint") if runtime is not None else None
        for kind in (entry if entry is not None else []):
            target = kind.get("assemblyName") or kind.get("commandLine")
            if target:
                return f"<{_tag(kind)} {target}>"
        return f"the {_tag(element)}'s .NET RoleEntryPoint"

    def _runtime(self, path: str, runtime: Element) -> None:
        if runtime.get("executionContext") == "elevated":
            self.gap(f"{path}/@executionContext", "role code runs limited in rolehost "
                     "(as `[service] limited_user` under root): move what needs root into "
                     "an elevated startup task")
        for child in runtime:
            if _tag(child) == "Environment":
                self.gap(_path(path, child), "the role's environment comes from its settings "
                         "(ROLEHOST_SETTING_NAME) and identity: add settings instead")
            elif _tag(child) != "EntryPoint":
                self.gap(_path(path, child), "not translated: rolehost has no equivalent")

    def _certificates(self, configured: Element | None) -> dict[str, str]:
        found: dict[str, str] = {}
        group = _child(configured, "Certificates") if configured is not None else None
        for certificate in _children(group, "Certificate") if group is not None else []:
            found[certificate.get("name") or ""] = certificate.get("thumbprint") or "?"
        return found

    def _settings(self, path: str, keys: tuple[str, ...], declared: Element,
                  configured: Element | None) -> dict[str, Any]:
        group = _child(configured, "ConfigurationSettings") if configured is not None else None
        values = {s.get("name") or "": s.get("value") or ""
                  for s in (_children(group, "Setting") if group is not None else [])}
        settings: dict[str, Any] = {}
        for setting in _children(declared, "Setting"):
            name = setting.get("name") or ""
            at = _path(path, setting)
            if name.startswith(PLUGIN_SETTING):
                self.gap(at, "a setting of a platform plugin (diagnostics, remote access): "
                             "not translated")
                values.pop(name, None)
                continue
            if not name or "=" in name:
                self.gap(at, "not a name an environment variable can carry: not translated")
                values.pop(name, None)
                continue
            if name not in values:
                self.gap(at, "not valued in the configuration: set to \"\"")
            value = values.pop(name, "")
            if SECRET_NAME.search(name):
                settings[name] = {"value": value, "secret": True}
                self.note((*keys, "settings", name), "secret by its name: never shown in "
                          "status, events or logs (drop `secret` to show it)")
            else:
                settings[name] = value
        for name in values:
            self.gap(f"/{_tag(self.configuration)}/Role/ConfigurationSettings/"
                     f"Setting[@name='{name}']",
                     "valued, but the definition declares no such setting: ignored")
        return settings

    def _endpoints(self, path: str, keys: tuple[str, ...], group: Element,
                   role: dict[str, Any], certificates: dict[str, str], used: set[str]) -> None:
        for element in group:
            tag, at = _tag(element), _path(path, element)
            name = self.name(at, element.get("name"), "endpoint")
            protocol = (element.get("protocol") or "tcp").lower()
            if protocol == "udp":
                self.gap(at, "udp: rolehost balances and discovers tcp and http only; "
                             "not translated")
                continue
            if element.get("localPort") is not None:
                self.gap(f"{at}/@localPort", (
                    "instance i binds the i-th public port itself"
                    if tag == "InstanceInputEndpoint" else "each instance gets a private "
                    "port instead") + f", read from RoleEnvironment.current_instance."
                    f"endpoints[{name!r}]")
            if tag == "InputEndpoint":
                endpoint = self._input(at, (*keys, "endpoints", name), element, protocol,
                                       certificates, used)
                if endpoint is not None:
                    role.setdefault("endpoints", {})[name] = endpoint
            elif tag == "InternalEndpoint":
                role.setdefault("internal_endpoints", {})[name] = self._internal(
                    at, element, protocol)
            elif tag == "InstanceInputEndpoint":
                endpoint = self._instance(at, element, protocol)
                if endpoint is not None:
                    role.setdefault("instance_endpoints", {})[name] = endpoint
            else:
                self.gap(at, "not translated: rolehost has no equivalent")

    def _input(self, path: str, keys: tuple[str, ...], element: Element, protocol: str,
               certificates: dict[str, str], used: set[str]) -> dict[str, Any] | None:
        port = _integer(element.get("port"))
        if port is None or not 1 <= port <= 65535:
            self.gap(f"{path}/@port", "expected a port from 1 to 65535: not translated")
            return None
        endpoint: dict[str, Any] = {"port": port, "protocol": protocol}
        if protocol == "https":
            certificate = element.get("certificate") or "certificate"
            used.add(certificate)
            endpoint["certificate"] = f"certs/{certificate}.pem"
            endpoint["key"] = f"certs/{certificate}.key"
            thumbprint = certificates.get(certificate, "not in the configuration")
            self.note((*keys, "certificate"), f"fill in: the certificate {certificate!r} "
                      f"(thumbprint {thumbprint}) as PEM, its key beside it")
            self.gap(f"{path}/@certificate", f"export the certificate {certificate!r} "
                     f"(thumbprint {thumbprint}) as PEM files to certs/{certificate}.pem "
                     f"and certs/{certificate}.key, beside rolehost.toml")
        elif protocol not in ("http", "tcp"):
            self.gap(f"{path}/@protocol", f"{protocol!r}: expected http, https, tcp or udp; "
                     "tcp is used")
            endpoint["protocol"] = "tcp"
        if element.get("ignoreRoleInstanceStatus") == "true":
            endpoint["ignore_status"] = True
        idle = _integer(element.get("idleTimeoutInMinutes"))
        if idle is not None:
            endpoint["idle_timeout"] = _seconds(idle * 60)
        for attribute in ("loadBalancer", "loadBalancerDistribution"):
            if element.get(attribute) is not None:
                self.gap(f"{path}/@{attribute}", "the built-in balancer spreads requests "
                         "round-robin or least-outstanding (`balance`): not translated")
        probe_name = element.get("loadBalancerProbe")
        if probe_name is not None:
            probe = self._probe(path, probe_name, port)
            if probe is not None:
                endpoint["probe"] = probe
        return endpoint

    def _probe(self, path: str, name: str, port: int) -> dict[str, Any] | None:
        if name not in self.probes:
            self.gap(f"{path}/@loadBalancerProbe", f"no probe {name!r} is defined: none used")
            return None
        self.probes_used.add(name)
        at, element = self.probes[name]
        probe: dict[str, Any] = {}
        if (element.get("protocol") or "tcp").lower() == "http":
            probe["path"] = element.get("path") or "/"
        interval = _integer(element.get("intervalInSeconds")) or PROBE_INTERVAL
        timeout = _integer(element.get("timeoutInSeconds")) or PROBE_TIMEOUT
        probe["interval"] = _seconds(interval)
        # The platform's timeout is how long a silent instance keeps its traffic: the
        # number of failed probes in a row that takes it out of rotation.
        probe["unhealthy"] = max(1, timeout // interval)
        probe_port = _integer(element.get("port"))
        if probe_port is not None and probe_port != port:
            self.gap(f"{at}/@port", "rolehost probes the endpoint's own private port on "
                     f"each instance, not port {probe_port}")
        return probe

    def _internal(self, path: str, element: Element, protocol: str) -> dict[str, Any]:
        if protocol not in ("http", "tcp"):
            self.gap(f"{path}/@protocol", f"{protocol!r}: an internal endpoint is tcp or "
                     "http; tcp is used")
            protocol = "tcp"
        endpoint: dict[str, Any] = {"protocol": protocol}
        # Bound where an instance has a machine of its own (run-instance, Kubernetes);
        # under `rolehost start`, each instance gets a private port and its peers find it.
        port = _integer(element.get("port"))
        if port is not None and 1 <= port <= 65535:
            endpoint["port"] = port
        for child in element:
            self.gap(_path(path, child), "a fixed port range: each instance gets a private "
                                         "port instead")
        return endpoint

    def _instance(self, path: str, element: Element, protocol: str) -> dict[str, Any] | None:
        allocate = _child(element, "AllocatePublicPortFrom")
        ports = _child(allocate, "FixedPortRange") if allocate is not None else None
        low = _integer(ports.get("min")) if ports is not None else None
        high = _integer(ports.get("max")) if ports is not None else None
        if low is None or high is None or not 1 <= low <= high <= 65535:
            self.gap(f"{path}/AllocatePublicPortFrom", "expected a FixedPortRange from 1 to "
                     "65535: not translated")
            return None
        endpoint: dict[str, Any] = {"public_ports": f"{low}-{high}" if high > low else str(low)}
        if protocol != "tcp":
            self.gap(f"{path}/@protocol", f"{protocol!r}: an instance input endpoint is tcp")
        return endpoint

    def _local_resources(self, path: str, group: Element) -> dict[str, Any]:
        resources: dict[str, Any] = {}
        for storage in _children(group, "LocalStorage"):
            at = _path(path, storage)
            resource: dict[str, Any] = {}
            size = _integer(storage.get("sizeInMB"))
            if size is not None and size >= 1:
                resource["size_mb"] = size
            clean = storage.get("cleanOnRoleRecycle")
            # The platform cleans unless told not to, as rolehost does.
            resource["clean_on_recycle"] = clean != "false"
            resources[self.name(at, storage.get("name"), "resource")] = resource
        return resources

    def _startup(self, path: str, startup: Element) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = []
        if startup.get("priority") is not None:
            self.gap(f"{path}/@priority", "startup tasks run in file order")
        for number, element in enumerate(_children(startup, "Task"), 1):
            at = f"{path}/Task[{number}]"
            command = (element.get("commandLine") or "").strip()
            if not command:
                self.gap(at, "a task without a commandLine: not translated")
                continue
            task: dict[str, Any] = {"command": command}
            if WINDOWS_COMMAND.search(command):
                self.gap(f"{at}/@commandLine", f"{command!r} is a Windows command: port it "
                         "to a command this machine runs")
            if any(c in command for c in "|&;<>$`"):
                task["shell"] = True
            context = element.get("executionContext") or "limited"
            task["context"] = context if context in ("limited", "elevated") else "limited"
            kind = element.get("taskType") or "simple"
            task["type"] = kind if kind in ("simple", "background", "foreground") else "simple"
            environment = _child(element, "Environment")
            variables = _children(environment, "Variable") if environment is not None else []
            env: dict[str, str] = {}
            for variable in variables:
                name = variable.get("name") or ""
                if variable.get("value") is not None and name and "=" not in name:
                    env[name] = variable.get("value") or ""
                else:
                    self.gap(_path(f"{at}/Environment", variable), "a value from the "
                             "platform (RoleInstanceValue): rolehost puts the instance's "
                             "identity and folders in every task's environment instead")
            if env:
                task["env"] = env
            tasks.append(task)
        return tasks


def _child_attr(element: Element, tag: str, attribute: str) -> str | None:
    child = _child(element, tag)
    return child.get(attribute) if child is not None else None
