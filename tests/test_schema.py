"""The published JSON schema (`rolehost schema`) accepts exactly what the model does."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from rolehost import definition

SCHEMA = definition.json_schema()
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
    schema = jsonschema.Draft202012Validator(SCHEMA).is_valid(document)
    assert (model, schema) == (valid, valid)


def test_the_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid(BASE)
