"""The published JSON schema (`rolehost schema`) accepts exactly what the model does, but
for the rules it names under `x-model-only`, which JSON Schema cannot state: an integral
float where an integer is expected (INTEGRAL_FLOATS), two values compared, and float
rounding."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
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
    from rolehost.schema import BLANK

    spelled = re.compile(f"[{_ecma(BLANK)}]")
    assert {c for c in map(chr, range(0x110000)) if spelled.fullmatch(c)} == {
        c for c in map(chr, range(0x110000)) if c.isspace()}


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.one_of(st.text("0123456789abcdefABCDEF:.%", max_size=45),
                 st.ip_addresses(v=6).map(str),
                 st.ip_addresses(v=6).map(lambda a: a.exploded)))
def test_the_ipv6_pattern_takes_what_python_takes(text: str) -> None:
    import ipaddress

    from rolehost.scalars import IPV6

    try:
        taken = ipaddress.IPv6Address(text).scope_id is None  # a zone is refused
    except ValueError:
        taken = False
    assert (re.fullmatch(IPV6, text) is not None) == taken


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(st.text(" \t\n'\"\\ab\u000b", max_size=10))
def test_the_command_pattern_takes_what_shlex_splits(command: str) -> None:
    import shlex

    from rolehost.schema import SPLITS

    try:
        words = shlex.split(command)
    except ValueError:
        splits = False
    else:  # no word at all is a blank command, which NOT_BLANK refuses
        splits = not words or words[0] != ""
    assert (re.search(_ecma(SPLITS), command) is not None) == splits
