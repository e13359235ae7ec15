"""The `rolehost.toml` model: parsing, validation with key paths, and defaults.

The model is the single source of truth for what a definition may say: the loader,
the error messages, the JSON schema (`rolehost schema`) and the reference docs all
come from the classes below.
"""

from __future__ import annotations

import math
import shlex
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rolehost.definition.endpoints import Balance as Balance
from rolehost.definition.endpoints import BalancerKind as BalancerKind
from rolehost.definition.endpoints import Endpoint as Endpoint
from rolehost.definition.endpoints import InstanceEndpoint as InstanceEndpoint
from rolehost.definition.endpoints import InternalEndpoint as InternalEndpoint
from rolehost.definition.endpoints import PeerProtocol as PeerProtocol
from rolehost.definition.endpoints import Probe as Probe
from rolehost.definition.endpoints import Protocol as Protocol
from rolehost.definition.errors import DefinitionError as DefinitionError
from rolehost.definition.errors import DefinitionErrors as DefinitionErrors
from rolehost.definition.explain import explain
from rolehost.definition.scalars import (
    ADDRESS_PATTERN,
    SIZE_PATTERN,
    SIZE_SYNTAX,
    check_size,
    parse_address,
    parse_size,
)
from rolehost.definition.scalars import MAX_DURATION as MAX_DURATION
from rolehost.definition.scalars import MAX_INSTANCES as MAX_INSTANCES
from rolehost.definition.scalars import MIN_INSTANCES as MIN_INSTANCES
from rolehost.definition.scalars import parse_duration as parse_duration
from rolehost.definition.schema import (
    NO_NUL,
    NOT_BLANK,
    SPLITS,
    VARIABLE_NAME,
    SchemaOnly,
    model_schema,
    published,
)
from rolehost.definition.site import SITE_ONLY_ENTRY_POINT, Site, site_endpoint
from rolehost.definition.types import Boolean, Duration, Integer, Text
from rolehost.definition.types import Model as _Model
from rolehost.limits import NAME_PATTERN as NAME_PATTERN

ENDPOINT_KINDS = ("endpoints", "internal_endpoints", "instance_endpoints")
SETTING_PREFIX, RESOURCE_PREFIX = "ROLEHOST_SETTING_", "ROLEHOST_RESOURCE_"
# How many instances a role may run: `instances`, `rolehost scale` and the API's scale.
Size = Annotated[str, BeforeValidator(check_size), SchemaOnly(pattern=SIZE_PATTERN)]
SettingValue = Annotated[str, SchemaOnly(pattern=NO_NUL)] | int | float | bool
# A service, role, endpoint or resource name. It becomes file and folder names, unit
# names and Kubernetes names: 63 characters (a DNS label) fits them all.
Name = Annotated[str, Field(
    strict=True, pattern=NAME_PATTERN, max_length=63,
    description="start with a letter, go on with letters, digits, `_` and `-`"),
]


STRICT_TYPES = ("An integer is a TOML integer: `2.0` and `\"2\"` are errors, as is a boolean or "
                "string of the wrong kind for its key.")
Word = Annotated[Text, SchemaOnly(pattern=NO_NUL)]  # of a command, or an environment value
Variable = Annotated[str, SchemaOnly(pattern=VARIABLE_NAME)]  # names a setting or a variable


class LocalResource(_Model):
    """Local storage: the folder `resources/NAME/` of each instance."""

    size_mb: Integer = Field(default=100, ge=1, description="quota; usage over it is reported")
    clean_on_recycle: Boolean = Field(
        default=True, description="empty the folder at every recycle, restart and reimage"
    )


class TaskType(StrEnum):
    simple = "simple"
    background = "background"
    foreground = "foreground"


class TaskContext(StrEnum):
    limited = "limited"
    elevated = "elevated"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class OncePer(StrEnum):
    start = "start"
    image = "image"
    disk = "disk"


class StartupTask(_Model):
    """A command the bootstrap runs before the host starts, in file order, with the
    instance's app/ as its folder and its identity, folders and settings in its
    environment. Its output, stdout and stderr together, goes to the instance log, on the
    stream `task N`."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"shell": {"const": True}}, "required": ["shell"]},
        "else": {"properties": {"command": {"pattern": SPLITS}}},
    })

    command: (Annotated[Text, SchemaOnly(pattern=NOT_BLANK)]
              # prefixItems: under 2020-12, `items` holds only for the words after it
              | Annotated[list[Word], SchemaOnly(minItems=1, prefixItems=[
                  {"type": "string", "minLength": 1, "pattern": NO_NUL}])]
              ) = Field(description="a string split like a shell, or a list")
    shell: Boolean = Field(default=False, description="run the string through /bin/sh")
    type: TaskType = Field(default=TaskType.simple, description="simple, background, foreground")
    context: TaskContext = Field(default=TaskContext.limited, description="limited or elevated")
    once_per: OncePer = Field(
        default=OncePer.start, description="start (every start), image (os/), disk (resources/)"
    )
    timeout: Annotated[Duration, Field(gt=0)] | None = Field(
        default=None, description="kill the task after this long"
    )
    env: dict[Variable, Word] = Field(default_factory=dict, description="extra environment")

    @field_validator("command")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError("expected a non-empty command")
        return value

    @model_validator(mode="after")
    def _runnable(self) -> StartupTask:
        # Without a shell, a string is split at every boot: one that cannot be split, or
        # names no program, would fail them all.
        argv = [self.command] if isinstance(self.command, str) and self.shell else self.command
        if isinstance(argv, str):
            try:
                argv = shlex.split(argv)
            except ValueError as exc:
                raise DefinitionError(None, "command", "expected a command that splits like "
                                      f"a shell's (or shell = true): {exc}") from None
        if any("\0" in word for word in argv):
            raise DefinitionError(None, "command", "expected a command without NUL characters")
        if not argv[0]:
            raise DefinitionError(None, "command", "expected a program to run, got an empty "
                                  "first word")
        return self

    @model_validator(mode="after")
    def _env_fits(self) -> StartupTask:
        for name, value in self.env.items():
            if problem := _environment_problem(name, value):
                raise DefinitionError(None, f"env.{name}", problem)
        return self


class Secret(_Model):
    """A setting whose value must not show: in status, events, logs or the history."""

    value: SettingValue
    secret: Boolean = True


class Role(_Model):
    """One role: a class run by `instances` host processes, a site, or both."""

    # Given, and not null: a key that is there with a null value is none (JSON has null).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["entry_point"], "properties": {"entry_point": {"type": "string"}}},
        {"required": ["site"], "properties": {"site": {"type": "object"}}}]})

    entry_point: Text | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
        description="module:Class, importable from the role's app folder; optional for a "
        "role with a site",
    )
    site: Site | None = Field(default=None, description="an ASGI or WSGI application "
                              "the host serves: a web role (docs/web-roles.md)")
    app: Annotated[Path, SchemaOnly(pattern=NO_NUL)] = Field(
        default=Path("."), description="folder deployed as each instance's app/")
    app_writable: Boolean = Field(
        default=False,
        description="under a root controller, each instance's app/ belongs to the role's "
        "user, who may change it; by default it can only read it")
    instances: Integer = Field(default=MIN_INSTANCES, ge=MIN_INSTANCES, le=MAX_INSTANCES,
                               description="how many instances")
    stop_timeout: Duration = Field(
        default=300.0, description="limit for `stopping` handlers plus on_stop"
    )
    status_check_interval: Duration = Field(
        default=5.0, gt=0, description="how often status-check handlers are asked"
    )
    max_memory: Size | None = Field(
        default=None,
        description=f"{SIZE_SYNTAX}. An instance whose host and descendants use more "
        "(their resident memory added up, measured every 5 s) is recycled gracefully, as "
        "PM2's max_memory_restart does: a `memory_recycle` event, and the reason in "
        "`status`; off",
    )
    settings: dict[Variable, SettingValue | Secret] = Field(
        default_factory=dict,
        description="names to strings, numbers or booleans, read with "
        "`RoleEnvironment.get_setting(name)`. A setting written `{ value = \"...\", secret = "
        "true }` is read the same way, and its value never shows in status, events, logs or "
        "the history. Each setting reaches the role's processes as the environment variable "
        f"`{SETTING_PREFIX}NAME` (upper case, `-` as `_`), and each local resource's path as "
        f"`{RESOURCE_PREFIX}NAME`: two names for one variable, a name with `=` or a value "
        "with a NUL character are errors. A change applied in place (`rolehost config set`) "
        "updates these variables in the host process; the processes the role had started "
        "before keep the environment they were started with")
    endpoints: dict[Name, Endpoint] = Field(default_factory=dict)
    internal_endpoints: dict[Name, InternalEndpoint] = Field(default_factory=dict)
    instance_endpoints: dict[Name, InstanceEndpoint] = Field(default_factory=dict)
    local_resources: dict[Name, LocalResource] = Field(
        default_factory=dict
    )
    startup_tasks: list[StartupTask] = Field(default_factory=list)

    @field_validator("app", mode="before")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # Resolving such a path raised ValueError: a traceback, not a key path.
        if isinstance(value, str) and "\0" in value:
            raise ValueError("expected a path without NUL characters")
        return value

    @model_validator(mode="after")
    def _runs_something(self) -> Role:
        if self.entry_point is None and self.site is None:
            raise DefinitionError(None, "entry_point", "required key is missing (a role "
                                  "without one needs a [site])")
        if self.site is not None:
            try:
                site_endpoint(self.site, self.endpoints)
            except ValueError as exc:
                raise DefinitionError(None, "site.endpoint", str(exc)) from None
        return self

    @model_validator(mode="after")
    def _fits_the_environment(self) -> Role:
        # Every setting and resource reaches the role as an environment variable: one that
        # cannot be set fails every boot, and two names for one variable lose a value.
        variables: dict[str, str] = {}
        for name, value in self.values.items():
            _check_variable(variables, f"settings.{name}", setting_variable(name), name, value)
        for name in self.local_resources:
            _check_variable(variables, f"local_resources.{name}", resource_variable(name), name)
        return self

    @model_validator(mode="after")
    def _endpoints_fit(self) -> Role:
        # One mapping in RoleEnvironment: an endpoint name is the role's, whatever its kind.
        seen: dict[str, str] = {}
        for kind in ENDPOINT_KINDS:
            for name in getattr(self, kind):
                if (other := seen.setdefault(name, kind)) != kind:
                    raise DefinitionError(None, f"{kind}.{name}", "expected a name no other "
                                          f"endpoint of the role has: {other}.{name} has it")
        for name, endpoint in self.instance_endpoints.items():
            if len(endpoint.ports) < self.instances:
                raise DefinitionError(
                    None, f"instance_endpoints.{name}.public_ports",
                    f"expected a port for each of the {self.instances} instances, got "
                    f"{len(endpoint.ports)} ({endpoint.public_ports})")
        return self

    @property
    def most_instances(self) -> tuple[int, str | None]:
        """How many instances the role may run, and the key that says so (None: only
        MAX_INSTANCES): each instance endpoint has a public port for each instance."""
        most, key = MAX_INSTANCES, None
        for name, endpoint in self.instance_endpoints.items():
            if len(endpoint.ports) < most:
                most, key = len(endpoint.ports), f"instance_endpoints.{name}.public_ports"
        return most, key

    def addresses(self) -> dict[str, tuple[str, str]]:
        """Every endpoint the instances bind, input, internal and instance, by name: the
        address it binds and the protocol the instances speak on it (an https
        endpoint's instances speak http: the balancer terminates TLS)."""
        found = {name: (ep.host, Protocol.http.value if ep.protocol is Protocol.https
                        else ep.protocol.value) for name, ep in self.endpoints.items()}
        for kind in ("internal_endpoints", "instance_endpoints"):
            found |= {name: (ep.host, ep.protocol.value)
                      for name, ep in getattr(self, kind).items()}
        return found

    @property
    def values(self) -> dict[str, SettingValue]:
        """The settings as the role reads them: secrets unwrapped."""
        return {k: v.value if isinstance(v, Secret) else v for k, v in self.settings.items()}

    @property
    def secrets(self) -> set[str]:
        return {k for k, v in self.settings.items() if isinstance(v, Secret) and v.secret}

    def redacted(self, settings: dict[str, Any]) -> dict[str, Any]:
        """`settings` with the values of this role's secret settings hidden."""
        return {k: "(secret)" if k in self.secrets else v for k, v in settings.items()}

    @property
    def entry_class(self) -> str:
        """The module:Class its hosts run: a site-only role's does nothing of its own."""
        return self.entry_point or SITE_ONLY_ENTRY_POINT

    @property
    def max_memory_bytes(self) -> int | None:
        return parse_size(self.max_memory) if self.max_memory is not None else None

    @property
    def module(self) -> str:
        return self.entry_class.partition(":")[0]

    @property
    def class_name(self) -> str:
        return self.entry_class.partition(":")[2]


def setting_variable(name: str) -> str:
    """The environment variable that carries setting `name` to tasks, and overrides it
    under `rolehost run-instance`."""
    return SETTING_PREFIX + name.upper().replace("-", "_")


def setting_variables(values: dict[str, SettingValue]) -> dict[str, str]:
    """The environment variables that carry a role's settings (secrets unwrapped) to its
    processes: one place for the spelling of a value, at a start and at a change alike."""
    return {setting_variable(name): str(value) for name, value in values.items()}


def resource_variable(name: str) -> str:
    """The environment variable that carries the path of local resource `name`."""
    return RESOURCE_PREFIX + name.upper().replace("-", "_")


def _environment_problem(name: str, value: object) -> str | None:
    """Why `name` (as part of a variable's name) and `value` cannot be put in a process
    environment; None if they can. The message never shows the value: it may be secret."""
    if not name or "=" in name or "\0" in name:
        return ("expected a name that is not empty, without '=' or NUL: it names an "
                "environment variable")
    if isinstance(value, str) and "\0" in value:
        return "expected a value without NUL characters: it is passed in the environment"
    if isinstance(value, float) and not math.isfinite(value):
        return "expected a finite number: NaN and infinity have no JSON form for the history"
    return None


def _check_variable(variables: dict[str, str], path: str, variable: str, name: str,
                    value: object = "") -> None:
    if problem := _environment_problem(name, value):
        raise DefinitionError(None, path, problem)
    if (other := variables.setdefault(variable, name)) != name:
        raise DefinitionError(None, path, f"expected a name of its own: {other!r} is passed "
                              f"as {variable} too")


class Service(_Model):
    """Service-wide settings: update domains, deadlines, the crash back-off, and the form
    of the instance logs."""

    name: Name = Field(description="service name")
    upgrade_domains: Integer = Field(default=5, ge=1, le=20,
                                     description="instance i is in UD i % N")
    ready_deadline: Duration = Field(
        default=1800.0, gt=0, description="from the start of startup tasks to ready"
    )
    # The lower bounds keep a crash loop from being a tight one: an instance that fails
    # waits at least backoff_initial, and one that restarts at once was ready a while.
    stable_after: Duration = Field(
        default=60.0, ge=0.5,
        description="ready this long, a crash restarts at once and resets back-off",
    )
    backoff_initial: Duration = Field(
        default=1.0, ge=0.1, description="first delay after a failure"
    )
    backoff_max: Duration = Field(default=60.0, ge=0.1, description="cap of the doubling delay")
    heartbeat_interval: Duration = Field(
        default=2.0, ge=0.1, le=60,
        description="how often each host says it is alive, from a thread no role code runs "
        "on. A host silent for 1.5 intervals (a heartbeat missed: stopped with SIGSTOP, or "
        "a C extension holding the GIL) leaves rotation until it is heard again; one silent "
        "for 15 intervals is killed and its instance recycles",
    )
    metrics: Annotated[Text, SchemaOnly(pattern=ADDRESS_PATTERN)] | None = Field(
        default=None,
        description="HOST:PORT to serve Prometheus metrics on (also GET /v1/metrics), "
        "[::1]:PORT for IPv6; off",
    )
    portal: Annotated[Text, SchemaOnly(pattern=ADDRESS_PATTERN)] | None = Field(
        default=None,
        description="HOST:PORT `rolehost portal` listens on when not given --listen; "
        "default 127.0.0.1:8484",
    )
    change_mode: Literal["per-ud", "blast"] = Field(
        default="per-ud",
        description="settings and topology changes one update domain at a time, or all at once"
    )
    limited_user: Text | None = Field(
        default=None, pattern=r"^[a-z_][a-z0-9_.-]*\$?$",
        description="who hosts and limited tasks run as when the controller is root: "
        "`dynamic` (the default), a user of its own for each role, allocated from uid "
        "327680 up as systemd's DynamicUser does, so that no role can signal or write "
        "another's processes and folders; a user's name, for every role; or `root`. By "
        "default, if the allocated users cannot run the interpreter, nobody, then root, "
        "with a warning",
    )
    instance_log_format: LogFormat = Field(
        default=LogFormat.text,
        description="each line of logs/INSTANCE.log: text (time, stream, then the line) "
        "or json (an object with time, stream, instance and line); `rolehost logs` reads both",
    )

    @field_validator("metrics", "portal")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        # The pattern, in the schema too, but a message a person can read.
        if value is not None:
            parse_address(value)
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> Service:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self


class Definition(_Model):
    """A whole `rolehost.toml`."""

    service: Service
    roles: dict[Name, Role] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ports(self) -> Definition:
        # By number alone: "localhost", "127.0.0.1" and "0.0.0.0" overlap, and which
        # spellings do is the resolver's to say, after the check (start failed with no
        # key path). Two listeners on one port are not worth that.
        seen: dict[int, str] = {}
        if self.service.metrics:
            seen[parse_address(self.service.metrics)[1]] = "service.metrics"
        taken: list[tuple[range, str]] = [(range(p, p + 1), o) for p, o in seen.items()]
        for role_name, role in self.roles.items():
            for ep_name, ep in role.endpoints.items():
                for key, ports in ep.port_ranges().items():
                    path = f"roles.{role_name}.endpoints.{ep_name}.{key}"
                    if ports.stop - 1 > 65535:
                        raise DefinitionError(None, path, f"ports {ports.start}-{ports.stop - 1}"
                                              f" (one per instance index) go past 65535")
                    _claim(taken, ports, path, "one per instance index")
            for ep_name, instance_ep in role.instance_endpoints.items():
                _claim(taken, instance_ep.ports,
                       f"roles.{role_name}.instance_endpoints.{ep_name}.public_ports",
                       "one per instance")
        return self


def _claim(taken: list[tuple[range, str]], ports: range, path: str, each: str) -> None:
    """Take `ports` for the key at `path`, or name the key that took one of them first."""
    for other, by in taken:
        if ports.start < other.stop and other.start < ports.stop:
            raise DefinitionError(None, path, (
                f"port {ports.start} is already used by {by}" if len(ports) == 1 else
                f"ports {ports.start}-{ports.stop - 1} ({each}) overlap {by}"))
    taken.append((ports, path))


def load(path: Path, base: Path | None = None) -> Definition:
    """Read and validate a definition; raise `DefinitionErrors` naming every problem.
    Relative paths in it are from `base` (default: the file's folder)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DefinitionErrors([DefinitionError(path, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionErrors([DefinitionError(path, "", f"cannot read: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionErrors([DefinitionError(path, "", f"invalid TOML: {exc}")]) from None
    return parse(raw, path, base)


def parse(raw: dict[str, Any], file: Path | None = None, base: Path | None = None
          ) -> Definition:
    """Validate an already-parsed document. `file` is named in errors, and its folder
    (or `base`) anchors the relative paths: `app`, an endpoint's certificate and key."""
    try:
        definition = Definition.model_validate(raw)
    except ValidationError as exc:
        raise DefinitionErrors(explain(exc.errors(), file, Definition)) from None
    if file is not None:
        base = (base or file.resolve().parent).resolve()
        roles = {
            name: role.model_copy(update={"app": (base / role.app).resolve(), "endpoints": {
                n: ep.model_copy(update={k: (base / path).resolve() for k in ("certificate", "key")
                                         if (path := getattr(ep, k)) is not None})
                for n, ep in role.endpoints.items()}})
            for name, role in definition.roles.items()
        }
        definition = definition.model_copy(update={"roles": roles})
    return definition


def parse_role(name: str, raw: dict[str, Any]) -> Role:
    """Validate role `name` alone (a settings change, say); errors name their key path as
    `parse` does, and never a setting's value."""
    try:
        return Role.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("roles", name, *e["loc"])} for e in exc.errors()]
        raise DefinitionErrors(explain(errors, None, Definition)) from None


def json_schema() -> dict[str, Any]:
    """The JSON schema of `rolehost.toml`, for editors and `rolehost schema`."""
    return published(model_schema(Definition))

