"""Fuzzing: the definition loader and the control API never fail in an unplanned way."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rolehost import definition
from support.roles import IDLE
from support.service import MakeService

KEYS = ["service", "roles", "name", "upgrade_domains", "ready_deadline", "stable_after",
        "backoff_initial", "backoff_max", "change_mode", "web", "worker", "entry_point",
        "app", "instances", "stop_timeout", "status_check_interval", "settings", "endpoints",
        "local_resources", "startup_tasks", "http", "port", "protocol", "host", "probe",
        "path", "command", "type", "once_per", "context", "timeout", "env", "size_mb",
        "clean_on_recycle", "x", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["5m", "90s", "app:Role", "http", "tcp", "image", "-1s"]))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)),
    max_leaves=30,
)
VALID = {"service": {"name": "s"}, "roles": {"web": {"entry_point": "app:Role"}}}


def _mutations() -> st.SearchStrategy[dict[str, Any]]:
    """A valid document with one key path replaced by something generated."""
    def mutate(value: Any, path: list[str]) -> dict[str, Any]:
        document = json.loads(json.dumps(VALID))
        node = document
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[path[-1]] = value
        return document

    paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)
    return st.builds(mutate, documents, paths)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents, _mutations()))
def test_the_loader_returns_a_model_or_a_key_path_error(document: Any) -> None:
    if not isinstance(document, dict):
        document = {"service": document}
    try:
        definition.parse(document)
    except definition.DefinitionErrors as errors:
        assert errors.errors
        for error in errors.errors:
            assert error.message
            assert error.path or error.message  # a key path, or what is wrong as a whole


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_valid_toml_or_a_clear_error(tmp_path_factory: Any, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "rolehost.toml"
    path.write_text(text)
    try:
        definition.load(path)
    except definition.DefinitionErrors as errors:
        assert str(errors).startswith(str(path))


PATHS = ["/v1/status", "/v1/instances/web%2F0", "/v1/instances/nope", "/v1/operations/restart",
         "/v1/operations/nope", "/v1/events?since=x", "/v1/events?since=3", "/v1/upgrades/agent",
         "/v1/upgrades/os", "/v1/walk", "/v1/walk/next", "/v1/packages", "/v1/deploy/nope",
         "/v1/roles/web/settings", "/v1/roles/web/instances", "/v1/roles/x/settings", "/",
         "/v1/operations", "/%ff%fe", "/v1/" + "a" * 3000]
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), documents),
    st.builds(lambda v: json.dumps({"instances": v, "wait": False, "settings": v,
                                    "count": v, "manual": v}).encode(), documents),
)


def test_malformed_api_requests_get_4xx_and_the_controller_serves_on(
    make_service: MakeService,
) -> None:
    service = make_service(IDLE)
    with service.harness() as h:
        h.wait_ready(30)

        @settings(max_examples=250, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "FOO"]), st.sampled_from(PATHS),
               bodies)
        def request(method: str, path: str, body: bytes) -> None:
            if path == "/v1/roles/web/instances" and b'"count"' in body:
                body = b"{}"  # a valid count would scale the role: not what is fuzzed here
            if path.startswith(("/v1/upgrades", "/v1/operations/restart")):
                body = b"{not json"  # and a valid one would start a walk or a restart
            raw = socket.socket(socket.AF_UNIX)
            raw.settimeout(10)
            raw.connect(str(h.run_dir.socket))
            raw.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                        f"\r\n\r\n".encode() + body)
            answer = raw.recv(65536)
            raw.close()
            status = int(answer.split(b" ", 2)[1])
            assert status < 500, answer[:300]

        request()
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(h.run_dir.socket))
        raw.sendall(b"\x00\xff garbage that is not HTTP\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 400")
        raw.close()
        assert h.instance("web/0")["state"] == "ready"  # still serving, instance untouched


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
