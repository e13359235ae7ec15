"""The published JSON schema (`rolehost schema`) accepts exactly what the model does, but
for the rules it names under `x-model-only`, which JSON Schema cannot state (EXCEPTIONS):
an integral float where an integer is expected (INTEGRAL_FLOATS), two values compared, and
float rounding. Hand-picked cases, then the same generated definitions to both."""

from __future__ import annotations

import copy
import re
from fractions import Fraction
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rolehost import definition

SCHEMA = definition.json_schema()


def _ecma(pattern: str) -> str:
    """`pattern` as JSON Schema reads it (ECMA-262): there `$` is the end of the text, where
    Python's also matches before a last newline ("web\\n" would pass for a name)."""
    return re.sub(r"(?<!\\)\$", r"(?![\\s\\S])", pattern)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if validator.is_type(instance, "string") and not re.search(_ecma(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


VALIDATOR = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                         {"pattern": _pattern})(SCHEMA)
BASE: dict[str, Any] = {
    "service": {"name": "shop"},
    "roles": {"web": {"entry_point": "app:Web", "endpoints": {"http": {"port": 18080}}}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with the key at dotted `path` set to `value` (tables made as needed)."""
    document = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return document


# (key path, value, valid): the model and the schema must both give that answer.
CASES = [
    ("roles.web.entry_point", None, False),
    ("roles.web.startup_tasks", [{"command": [None, "-c", ""]}], False),
    ("roles.web.startup_tasks", [{"command": ["a\0", "-c"]}], False),
    ("roles.web.max_memory", "200MB", True),
    ("roles.web.max_memory", "1KB", True),
    ("roles.web.max_memory", "2GB", True),
    ("roles.web.max_memory", "0MB", False),
    ("roles.web.max_memory", "200", False),
    ("roles.web.max_memory", 200, False),
    ("roles.web.max_memory", "200mb", False),
    ("roles.web.max_memory", "1.5GB", False),
    ("roles.web.max_memory", "200MB\n", False),
    ("roles.web.max_memory", "12345678901MB", False),
    ("service.heartbeat_interval", "100ms", True),
    ("service.heartbeat_interval", "50ms", False),
    ("service.heartbeat_interval", "61s", False),
    ("service.ready_deadline", "30m", True),
    ("service.ready_deadline", 0, False),
    ("service.ready_deadline", "0s", False),
    ("service.ready_deadline", 0.5, True),
    ("service.ready_deadline", "0.5s", True),
    ("roles.web.status_check_interval", 0, False),
    ("roles.web.status_check_interval", "0ms", False),
    ("roles.web.stop_timeout", 0, True),
    ("roles.web.stop_timeout", 604800, True),
    ("roles.web.stop_timeout", 604801, False),
    ("roles.web.endpoints.http.probe.interval", 0, False),
    ("roles.web.endpoints.http.probe.interval", "00.00s", False),
    ("roles.web.endpoints.http.probe.timeout", "250ms", True),
    ("roles.web.endpoints.http.slow_start", 0, True),
    ("service.stable_after", 0, False),
    ("service.stable_after", 0.5, True),
    ("service.backoff_initial", 0, False),
    ("service.backoff_initial", 0.05, False),
    ("service.backoff_initial", 0.1, True),
    ("service.backoff_max", 0, False),
    ("roles.web.startup_tasks", [{"command": "true", "timeout": 0}], False),
    ("roles.web.startup_tasks", [{"command": "true", "timeout": "0s"}], False),
    ("roles.web.startup_tasks", [{"command": "true", "timeout": "500ms"}], True),
    ("roles.web.startup_tasks", [{"command": "true", "timeout": 604801}], False),
    ("service.metrics", "127.0.0.1:9464", True),
    ("service.metrics", "localhost:65535", True),
    ("service.metrics", "127.0.0.1:99999", False),
    ("service.metrics", "127.0.0.1:0", False),
    ("service.instance_log_format", "text", True),
    ("service.instance_log_format", "json", True),
    ("service.instance_log_format", "JSON", False),
    ("service.instance_log_format", "jsonl", False),
    ("service.instance_log_format", True, False),
    # TOML has real integers, booleans and strings: each key takes its own type as it is,
    # never one pydantic's lax mode would convert ("8080" to 8080, true to 1, "yes" to True).
    ("roles.web.instances", 2, True),
    ("roles.web.instances", "2", False),
    ("roles.web.instances", True, False),
    ("roles.web.instances", 2.5, False),
    ("roles.web.endpoints.http.port", "8080", False),
    ("roles.web.endpoints.http.port", True, False),
    ("roles.web.endpoints.http.probe.healthy", 3, True),
    ("roles.web.endpoints.http.probe.healthy", "3", False),
    ("roles.web.endpoints.http.probe.unhealthy", True, False),
    ("roles.web.local_resources.cache.size_mb", "100", False),
    ("service.upgrade_domains", "5", False),
    ("service.upgrade_domains", True, False),
    ("roles.web.endpoints.http.ignore_status", True, True),
    ("roles.web.endpoints.http.ignore_status", "yes", False),
    ("roles.web.endpoints.http.ignore_status", 1, False),
    ("roles.web.endpoints.http.ignore_status", 0, False),
    ("roles.web.local_resources.cache.clean_on_recycle", False, True),
    ("roles.web.local_resources.cache.clean_on_recycle", "false", False),
    ("roles.web.startup_tasks", [{"command": "true", "shell": True}], True),
    ("roles.web.startup_tasks", [{"command": "true", "shell": "true"}], False),
    ("roles.web.startup_tasks", [{"command": "true", "shell": 1}], False),
    ("roles.web.settings.token", {"value": "x", "secret": False}, True),
    ("roles.web.settings.token", {"value": "x", "secret": "yes"}, False),
    ("roles.web.settings.token", {"value": "x", "secret": 1}, False),
    ("roles.web.settings.port", "8080", True),  # a setting is whatever type it is given
    ("roles.web.settings.on", True, True),
    ("roles.web.endpoints.http.host", 127, False),
    ("roles.web.entry_point", 1, False),
    # Strings the model reads into other types still come as TOML strings.
    ("roles.web.app", "src", True),
    ("roles.web.endpoints.http.protocol", "tcp", True),
    ("roles.web.endpoints.http.balance", "least-outstanding", True),
    # https names its certificate and key (which files they are is checked on reading a
    # file), and only https does.
    ("roles.web.endpoints.http.protocol", "https", False),
    ("roles.web.endpoints.http", {"port": 18080, "protocol": "https", "certificate": "c.pem",
                                  "key": "k.pem"}, True),
    ("roles.web.endpoints.http", {"port": 18080, "protocol": "https", "key": "k.pem"}, False),
    ("roles.web.endpoints.http.certificate", "c.pem", False),
    ("roles.web.endpoints.http", {"port": 18080, "protocol": "tcp", "key": "k.pem"}, False),
    ("roles.web.internal_endpoints.rpc", {}, True),
    ("roles.web.internal_endpoints.rpc", {"protocol": "http", "port": 7000}, True),
    ("roles.web.internal_endpoints.rpc", {"protocol": "https"}, False),
    ("roles.web.internal_endpoints.rpc", {"port": 0}, False),
    ("roles.web.instance_endpoints.debug", {"public_ports": "10100-10109"}, True),
    ("roles.web.instance_endpoints.debug", {"public_ports": "10100"}, True),
    ("roles.web.instance_endpoints.debug", {"public_ports": 10100}, False),
    ("roles.web.instance_endpoints.debug", {"public_ports": "10100-65536"}, False),
    ("roles.web.instance_endpoints.debug", {"public_ports": "0-3"}, False),
    ("roles.web.instance_endpoints.debug", {"public_ports": "10100 - 10109"}, False),
    ("roles.web.instance_endpoints.debug", {}, False),
    ("roles.web.startup_tasks", [{"command": "true", "type": "background",
                                  "context": "elevated", "once_per": "image"}], True),
    # A duration is an int or a float of seconds, or a string with no space in or around it.
    ("roles.web.stop_timeout", 90, True),
    ("roles.web.stop_timeout", 1.5, True),
    ("roles.web.stop_timeout", "5m", True),
    ("roles.web.stop_timeout", " 5 m ", False),
    ("roles.web.stop_timeout", "5 m", False),
    ("roles.web.stop_timeout", " 5m", False),
    ("roles.web.stop_timeout", "5m ", False),
    ("roles.web.stop_timeout", "\u0665s", False),  # an Arabic-Indic 5: ASCII digits only
    ("roles.web.stop_timeout", True, False),
    # A duration string is held to its key's bounds, in each unit, as a number is.
    ("service.backoff_initial", "50ms", False),
    ("service.backoff_initial", "100ms", True),
    ("service.backoff_initial", "0.001m", False),
    ("service.backoff_initial", "0.0017m", True),
    ("service.stable_after", "0.4s", False),
    ("service.stable_after", "500ms", True),
    ("roles.web.stop_timeout", "169h", False),
    ("roles.web.stop_timeout", "10081m", False),
    ("roles.web.stop_timeout", "10080m", True),
    ("roles.web.stop_timeout", "604800000ms", True),
    ("roles.web.stop_timeout", "604800000.5ms", False),
    # HOST:PORT: one rule, the CLI's and the model's; IPv6 in brackets.
    ("service.metrics", "[::1]:9464", True),
    ("service.metrics", "[2001:db8::ffff:1.2.3.4]:9464", True),
    ("service.metrics", "::1:9464", False),
    ("service.metrics", "[::1]", False),
    ("service.metrics", "[1::2::3]:9464", False),
    ("service.metrics", "127.0.0.1:\u0668\u0660", False),
    ("service.metrics", "127.0.0.1:80\n", False),
    # Names, keys included: a table's key that is no name was let through, with any value.
    ("service.name", "shop\n", False),
    ("roles.web.endpoints", {"1http": {"port": 18081}}, False),
    ("roles.web.endpoints", {"http": {"port": 18080}, "bad name": "anything"}, False),
    ("roles.web.local_resources", {"c" * 64: {}}, False),
    ("roles.web.entry_point", "app:Caf\u00e9", False),
    # What goes into a process's environment, or its arguments.
    ("roles.web.settings", {"a=b": 1}, False),
    ("roles.web.settings", {"": 1}, False),
    ("roles.web.settings.token", "a\u0000b", False),
    ("roles.web.settings.token", {"value": "a\u0000b", "secret": True}, False),
    ("roles.web.app", "src\u0000", False),
    ("roles.web.startup_tasks", [{"command": "true", "env": {"A=B": "x"}}], False),
    ("roles.web.startup_tasks", [{"command": "true", "env": {"A": "x\u0000"}}], False),
    ("roles.web.startup_tasks", [{"command": "echo 'unclosed"}], False),
    ("roles.web.startup_tasks", [{"command": "echo 'unclosed", "shell": True}], True),
    ("roles.web.startup_tasks", [{"command": "echo trailing\\"}], False),
    ("roles.web.startup_tasks", [{"command": "echo \"a \\\" b\" 'c\\'"}], True),
    ("roles.web.startup_tasks", [{"command": "'' x"}], False),
    ("roles.web.startup_tasks", [{"command": "''x"}], True),
    ("roles.web.startup_tasks", [{"command": "'' x", "shell": True}], True),
    ("roles.web.startup_tasks", [{"command": "\u000b"}], False),
    ("roles.web.startup_tasks", [{"command": "\u3000", "shell": True}], False),
    ("roles.web.startup_tasks", [{"command": "a\u0000", "shell": True}], False),
    ("roles.web.startup_tasks", [{"command": []}], False),
    ("roles.web.startup_tasks", [{"command": ["", "x"]}], False),
    ("roles.web.startup_tasks", [{"command": ["x", ""]}], True),
    ("roles.web.startup_tasks", [{"command": ["x", "\u0000"]}], False),
    # A web role's site: one application, ASGI or WSGI; a role with one may have no class.
    ("roles.web.site", {"asgi": "shop.web:app", "warmup": ["/", "/catalog"]}, True),
    ("roles.web.site", {"wsgi": "mysite.wsgi:application", "endpoint": "http"}, True),
    ("roles.web.site", {"asgi": "a:b", "wsgi": "c:d"}, False),
    ("roles.web.site", {}, False),
    ("roles.web.site", {"asgi": "shop.web"}, False),
    ("roles.web.site", {"asgi": "a:b", "warmup": ["catalog"]}, False),
    ("roles.web.site", {"asgi": "a:b", "warmup_timeout": "0s"}, False),
    ("roles.web.site", {"asgi": "a:b", "port": 80}, False),
    ("roles.web", {"site": {"asgi": "a:b"}, "endpoints": {"http": {"port": 18080}}}, True),
    ("roles.web", {"endpoints": {"http": {"port": 18080}}}, False),
]


@pytest.mark.parametrize(("path", "value", "valid"), CASES,
                         ids=[f"{p}={v!r}" for p, v, _ in CASES])
def test_the_schema_and_the_model_agree(path: str, value: Any, valid: bool) -> None:
    document = _with(path, value)
    try:
        definition.parse(document)
        model = True
    except definition.DefinitionErrors:
        model = False
    schema = VALIDATOR.is_valid(document)
    assert (model, schema) == (valid, valid)


# Every integer key given a TOML float with nothing after the point. TOML tells 2.0 from 2,
# and the model refuses it as it refuses "2"; JSON has one number type, so JSON Schema's
# "integer" is any number without a fraction and the schema takes it. The one known way
# in which the schema accepts what the model does not.
INTEGRAL_FLOATS = [
    ("roles.web.instances", 2.0),
    ("roles.web.endpoints.http.port", 18080.0),
    ("roles.web.endpoints.http.probe.healthy", 3.0),
    ("roles.web.endpoints.http.probe.unhealthy", 3.0),
    ("roles.web.local_resources.cache.size_mb", 100.0),
    ("service.upgrade_domains", 5.0),
]


def _integer_keys(schema: dict[str, Any]) -> set[str]:
    """The names of the schema's integer keys, wherever they are."""
    found = set()
    for definition_ in [schema, *schema.get("$defs", {}).values()]:
        for key, prop in definition_.get("properties", {}).items():
            if prop.get("type") == "integer":
                found.add(key)
    return found


def test_every_integer_key_is_tried_with_an_integral_float() -> None:
    # A new integer key joins INTEGRAL_FLOATS, so that its 2.0 is seen to be refused.
    assert _integer_keys(SCHEMA) == {path.rpartition(".")[2] for path, _ in INTEGRAL_FLOATS}


@pytest.mark.parametrize(("path", "value"), INTEGRAL_FLOATS,
                         ids=[f"{p}={v!r}" for p, v in INTEGRAL_FLOATS])
def test_an_integral_float_is_refused_by_the_model_only(path: str, value: float) -> None:
    document = _with(path, value)
    with pytest.raises(definition.DefinitionErrors,
                       match=rf"{re.escape(path)}: expected an integer, got {value!r}"):
        definition.parse(document)
    assert VALIDATOR.is_valid(document)
    assert not VALIDATOR.is_valid(_with(path, value + 0.5))


def test_the_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert VALIDATOR.is_valid(BASE)


def test_the_schema_spells_out_pythons_white_space() -> None:
    # A blank command is what str.strip() leaves empty: the schema's class must be that set.
    from rolehost.definition.schema import BLANK

    spelled = re.compile(f"[{_ecma(BLANK)}]")
    assert {c for c in map(chr, range(0x110000)) if spelled.fullmatch(c)} == {
        c for c in map(chr, range(0x110000)) if c.isspace()}


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.one_of(st.text("0123456789abcdefABCDEF:.%", max_size=45),
                 st.ip_addresses(v=6).map(str),
                 st.ip_addresses(v=6).map(lambda a: a.exploded)))
def test_the_ipv6_pattern_takes_what_python_takes(text: str) -> None:
    import ipaddress

    from rolehost.definition.scalars import IPV6

    try:
        taken = ipaddress.IPv6Address(text).scope_id is None  # a zone is refused
    except ValueError:
        taken = False
    assert (re.fullmatch(IPV6, text) is not None) == taken


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(st.text(" \t\n'\"\\ab\u000b", max_size=10))
def test_the_command_pattern_takes_what_shlex_splits(command: str) -> None:
    import shlex

    from rolehost.definition.schema import SPLITS

    try:
        words = shlex.split(command)
    except ValueError:
        splits = False
    else:  # no word at all is a blank command, which NOT_BLANK refuses
        splits = not words or words[0] != ""
    assert (re.search(_ecma(SPLITS), command) is not None) == splits


# --- the same generated definitions, to the model and to the schema ------------------

# Each rule of `x-model-only`, and how to tell that a disagreement is that rule's: by the
# model's message (it refused what the schema took), or, for floats, by the document.
def _finer_than_a_float(document: Any) -> bool:
    """A duration string that a float cannot hold: too many digits, or too small."""
    if isinstance(document, dict):
        return any(_finer_than_a_float(v) for v in document.values())
    if isinstance(document, list):
        return any(_finer_than_a_float(v) for v in document)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?", str(document))
    if not isinstance(document, str) or not match:
        return False
    exact = Fraction(match.group(1))
    return len(match.group(1).replace(".", "").strip("0")) > 15 or 0 < exact < 1e-300


EXCEPTIONS: dict[str, Any] = {
    "integral-float": re.compile(r"expected an integer, got -?[0-9]+(\.0|e\+[0-9]+)"),
    "backoff-order": re.compile(r"backoff_max must be at least backoff_initial"),
    # An external endpoint's instance and readiness ports: a range per endpoint.
    "unique-ports": re.compile(r"port [0-9]+ is already used by |ports [0-9]+-[0-9]+ \(one "
                               r"per instance index\) (overlap|go past 65535)"),
    "one-name-per-variable": re.compile(r"expected a name of its own: "),
    "site-endpoint": re.compile(r"expected one of the role's endpoints|the role has (no "
                                r"endpoint|[0-9]+ endpoints)|expected an http endpoint"),
    "instance-ports": re.compile(r"expected a port for each of the |expected a range from a "
                                 r"lower port to a higher one"),
    "endpoint-names": re.compile(r"expected a name no other endpoint of the role has"),
    "float-precision": _finer_than_a_float,
}
# One document for each: the model refuses it, a JSON-Schema validator takes it.
EXCEPTION_EXAMPLES = {
    "integral-float": _with("roles.web.instances", 2.0),
    "backoff-order": _with("service.backoff_initial", "2m"),
    "unique-ports": _with("service.metrics", "127.0.0.1:18080"),
    "one-name-per-variable": _with("roles.web.settings", {"color": 1, "COLOR": 2}),
    "site-endpoint": _with("roles.web.site", {"asgi": "shop.web:app", "endpoint": "api"}),
    "float-precision": _with("roles.web.status_check_interval", "0." + "0" * 330 + "1"),
    "instance-ports": _with("roles.web.instance_endpoints.debug.public_ports", "10109-10100"),
    "endpoint-names": _with("roles.web.internal_endpoints.http", {}),
}


def _model_verdict(document: dict[str, Any]) -> list[definition.DefinitionError] | None:
    """None if the model takes `document`, else its errors."""
    try:
        definition.parse(document)
    except definition.DefinitionErrors as refused:
        return refused.errors
    return None


def _explained(document: dict[str, Any], errors: list[definition.DefinitionError] | None,
               ) -> set[str]:
    """The exceptions that account for the model and the schema disagreeing on `document`."""
    found = {name for name, rule in EXCEPTIONS.items() if callable(rule) and rule(document)}
    if errors is not None and all(any(
            isinstance(rule, re.Pattern) and rule.search(e.message)
            for rule in EXCEPTIONS.values()) for e in errors):
        found |= {name for name, rule in EXCEPTIONS.items() if isinstance(rule, re.Pattern)
                  and any(rule.search(e.message) for e in errors)}
    return found


def test_the_exceptions_are_the_schemas_and_each_is_real() -> None:
    """The exceptions are those the schema names, no more; each exists (when JSON Schema
    can state one, the schema says it and it leaves both lists)."""
    assert set(EXCEPTIONS) == set(SCHEMA["x-model-only"]) == set(EXCEPTION_EXAMPLES)
    for name, document in EXCEPTION_EXAMPLES.items():
        errors = _model_verdict(document)
        assert errors is not None and VALIDATOR.is_valid(document), name
        assert _explained(document, errors) == {name}


names = st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True)
durations = st.one_of(st.integers(1, 3600), st.floats(0.5, 3600),
                      st.sampled_from(["90s", "5m", "1h", "250ms", "1.5s", "2", "0.5m"]))
setting_values = st.one_of(
    st.text(st.characters(exclude_characters="\0"), max_size=5), st.integers(-5, 10**6),
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.fixed_dictionaries({"value": st.text("ab", max_size=3)},
                          optional={"secret": st.booleans()}))


@st.composite
def valid_definitions(draw: st.DrawFn) -> dict[str, Any]:
    """Definitions the model takes: each key present or not, with a value in range."""
    service: dict[str, Any] = {"name": draw(names)}
    optional = {
        "upgrade_domains": st.integers(1, 20), "ready_deadline": durations,
        "stable_after": st.sampled_from([0.5, 60, "90s", "1h"]),  # not under 0.5
        "backoff_initial": st.sampled_from([0.1, "250ms", 1]),
        "backoff_max": st.sampled_from([1, "1m", 120.5]),
        "change_mode": st.sampled_from(["per-ud", "blast"]),
        "limited_user": st.sampled_from(["nobody", "svc_user$"]),
        "heartbeat_interval": st.sampled_from([0.1, "500ms", "2s", 60]),
    }
    service.update(draw(st.fixed_dictionaries({}, optional=optional)))
    # Not 20000-21999: the instance endpoints' ranges (below).
    ports = iter(draw(st.lists(st.integers(1, 65535).filter(lambda p: not 20000 <= p < 22000),
                               min_size=6, max_size=6, unique=True)))
    if draw(st.booleans()):
        service["metrics"] = draw(st.sampled_from(["127.0.0.1", "[::1]", "localhost"])) \
            + f":{next(ports)}"
    roles = {}
    for name in draw(st.lists(names, min_size=1, max_size=2, unique=True)):
        role: dict[str, Any] = {"entry_point": draw(st.sampled_from(["app:Web", "a.b:C_1"]))}
        role.update(draw(st.fixed_dictionaries({}, optional={
            "app": st.sampled_from([".", "src", "../apps/web"]),
            "instances": st.integers(1, 1000), "stop_timeout": durations,
            "status_check_interval": durations,
            "max_memory": st.sampled_from(["1KB", "200MB", "9999999999GB"]),
            "settings": st.dictionaries(st.sampled_from(["color", "workers", "api-key"]),
                                        setting_values, max_size=3),
            "local_resources": st.dictionaries(st.sampled_from(["cache", "data"]),
                                               st.fixed_dictionaries({}, optional={
                                                   "size_mb": st.integers(1, 10**6),
                                                   "clean_on_recycle": st.booleans()})),
            "startup_tasks": st.lists(st.fixed_dictionaries(
                {"command": st.sampled_from(["true", "echo 'a b'", ["python3", "-c", ""]])},
                optional={"shell": st.booleans(), "timeout": durations,
                          "type": st.sampled_from(["simple", "background", "foreground"]),
                          "once_per": st.sampled_from(["start", "image", "disk"]),
                          "env": st.dictionaries(st.sampled_from(["A", "B_C"]),
                                                 st.text("xy", max_size=2))}), max_size=2),
        })))
        endpoints = {}
        for endpoint in draw(st.lists(st.sampled_from(["http", "api"]), unique=True)):
            endpoints[endpoint] = {"port": next(ports), **draw(st.fixed_dictionaries({}, optional={
                "protocol": st.sampled_from(["http", "tcp"]), "host": st.just("::1"),
                "balance": st.sampled_from(["round-robin", "least-outstanding"]),
                "drain_timeout": durations, "idle_timeout": st.sampled_from([0, "0s", 60]),
                "probe": st.fixed_dictionaries({}, optional={
                    "path": st.just("/health"), "interval": durations,
                    "healthy": st.integers(1, 5)})}))}
        if endpoints:
            role["endpoints"] = endpoints
        if draw(st.booleans()):
            role["internal_endpoints"] = {"rpc": draw(st.fixed_dictionaries({}, optional={
                "protocol": st.sampled_from(["tcp", "http"]), "host": st.just("::1"),
                "port": st.integers(1, 65535)}))}
        if draw(st.booleans()):  # far from the other ports, and enough for the instances
            first = 20000 + 1000 * len(roles)
            role["instance_endpoints"] = {"debug": {
                "public_ports": f"{first}-{first + role.get('instances', 1) - 1}",
                **draw(st.fixed_dictionaries({}, optional={
                    "protocol": st.sampled_from(["tcp", "http"])}))}}
        roles[name] = role
    return {"service": service, "roles": roles}


# Values a mutation puts anywhere: of every type, at the bounds of the keys' ranges and
# just past them, and the syntaxes of durations, addresses, names and commands, good and bad.
decimals = st.builds(lambda zeros, whole, part, unit: f"{'0' * zeros}{whole}{part}{unit}",
                     st.integers(0, 2), st.integers(0, 700_000),
                     st.sampled_from(["", ".0", ".05", ".1", ".5", ".0016", ".0017", ".999"]),
                     st.sampled_from(["", "ms", "s", "m", "h"]))
wild = st.one_of(
    decimals, decimals, st.none(), st.booleans(), st.integers(-2, 3),
    st.sampled_from([20, 21, 1000, 1001, 65535, 65536, 604800, 604801, 10**20, -1]),
    st.sampled_from([0.0, 0.05, 0.1, 0.5, 2.0, 2.5, 1e300, -0.5, 604800.0, 604800.5]),
    st.sampled_from(["", " 5m", "5 m", "1e3", "\u0665s", "5m\n", "-1s", "http", "tcp", "disk",
                     "elevated", "blast", "nobody", "/x", "x",
                     "[::1]:80", "::1:80", "h:0", "h:65536", "[::1]", "[1::2::3]:80",
                     "0.0.0.0:9090", "h h:80", "app:Caf\u00e9", ":C", "a:B", "1x", "a b",
                     "web\n", "c" * 64, "a=b", "a\0", "200MB", "0MB", "2gb", "1.5GB"]),
    st.text("ab '\"\\\t\n\0=\u000b", max_size=6),
    st.lists(st.text("a '\0", max_size=2), max_size=3),
    st.sampled_from([{}, {"value": "x"}, {"value": 1, "secret": "yes"}, {"port": 18090},
                     {"command": "true"}, {"entry_point": "a:B"}]),
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


def _at(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def _mutate(data: st.DataObject, document: dict[str, Any]) -> None:
    """One change to `document`, anywhere: a value replaced, a key removed, added or
    renamed, a port taken twice, the back-off reversed."""
    kind = data.draw(st.sampled_from(["value"] * 5 + ["replace", "remove", "add", "rename",
                                                      "port", "backoff"]))
    paths = _paths(document)[1:]
    if kind == "value":  # most rules are a key's: change a value rather than a table
        paths = [p for p in paths if not isinstance(_at(document, p), dict | list)]
    path = data.draw(st.sampled_from(paths))
    parent = _at(document, path[:-1])
    if kind in ("value", "replace"):
        parent[path[-1]] = data.draw(wild)
    elif kind == "remove" and isinstance(parent, dict):
        del parent[path[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from(["x", "Name", "ports", "endpoint"]))] = data.draw(wild)
    elif kind == "rename" and isinstance(parent, dict):
        key = path[-1]
        new = data.draw(st.sampled_from([str(key).upper(), str(key).replace("-", "_") + "-",
                                         "1x", "a b", "", "a=b", "web\n", "c" * 64]))
        parent[new] = parent.pop(key)
    elif kind == "port":
        ports = [p for p in _paths(document) if p[-1:] == ("port",)]
        if ports:
            taken = _at(document, data.draw(st.sampled_from(ports)))
            if data.draw(st.booleans()) or len(ports) == 1:
                document["service"]["metrics"] = f"127.0.0.1:{taken}"
            else:
                target = data.draw(st.sampled_from(ports))
                _at(document, target[:-1])["port"] = taken
    elif kind == "backoff":
        document["service"]["backoff_initial"] = data.draw(st.sampled_from([2, "90s", "1m"]))
        if data.draw(st.booleans()):
            document["service"]["backoff_max"] = data.draw(st.sampled_from([1, "1m", 60.5]))


@settings(max_examples=50, derandomize=True, database=None, deadline=None)
@given(valid_definitions())
def test_generated_definitions_are_valid_for_both(document: dict[str, Any]) -> None:
    assert _model_verdict(document) is None
    assert VALIDATOR.is_valid(document), list(VALIDATOR.iter_errors(document))


# Derandomized: the same examples on every run, in CI too; a few seconds.
@settings(max_examples=250, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(valid_definitions(), st.integers(1, 2), st.data())
def test_the_model_and_the_schema_give_the_same_verdicts(
        document: dict[str, Any], changes: int, data: st.DataObject) -> None:
    for _ in range(changes):
        _mutate(data, document)
    errors = _model_verdict(document)
    schema = VALIDATOR.is_valid(document)
    if (errors is None) == schema:
        return
    why = _explained(document, errors)
    assert why, (f"the model {'refuses' if errors else 'takes'} what the schema "
                 f"{'takes' if schema else 'refuses'}: {document!r}\n{errors}")
