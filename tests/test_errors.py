"""The domain's errors, as the API answers them and as the CLI exits for them: the two
tables (api.ANSWERS, exits.EXIT_CODES) against the contract docs/api.md and
docs/concepts.md document, the answers on the wire, and the one error no other test
file provokes through the CLI (an operation while the controller stops)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from rolehost.client import ApiError
from rolehost.control import api, exits
from rolehost.fabric import errors
from support.cli import rolehost
from support.roles import ON_STOP_WAITS_FOR_RELEASE
from support.service import MakeService

# Each error as documented: its status, its kind, and what `rolehost` exits with. Every
# row of api.ANSWERS has a line here (test_every_answer_is_in_the_contract).
CONTRACT: list[tuple[Exception, int, str, int]] = [
    (errors.Invalid("bad"), 400, "invalid", 2),
    (errors.NotFound("none"), 404, "not-found", 2),
    (api.MethodNotAllowed("GET only"), 405, "not-allowed", 1),
    (errors.Conflict("busy"), 409, "conflict", 1),
    (api.TooLarge("big"), 413, "too-large", 1),
    (api.UrlTooLong("long"), 414, "too-large", 1),
    (errors.DoesNotLoad("broken"), 422, "does-not-load", 2),
    (errors.OperationFailed("not ready"), 500, "failed", 1),
    (errors.Unavailable("stopping"), 503, "unavailable", 1),
    (errors.RefusedInPreflight(errors.NotFound("no package")), 404, "preflight", 2),
    (errors.RefusedInPreflight(errors.Conflict("incompatible")), 409, "preflight", 2),
    (errors.RefusedInPreflight(errors.DoesNotLoad("no module")), 422, "preflight", 2),
    (RuntimeError("a bug"), 500, "internal", 1),
]


@pytest.mark.parametrize(("error", "status", "kind", "code"), CONTRACT,
                         ids=[f"{type(e).__name__}-{s}" for e, s, _, _ in CONTRACT])
def test_each_error_is_answered_and_exits_as_documented(
        error: Exception, status: int, kind: str, code: int) -> None:
    assert api.answer(error) == (status, kind)
    assert exits.for_kind(kind) == code


def test_every_answer_is_in_the_contract() -> None:
    """A row added to api.ANSWERS is documented before it ships."""
    rows = {next(base for base in type(error).__mro__ if base in api.ANSWERS)
            for error, *_ in CONTRACT}
    assert rows == set(api.ANSWERS)


def test_every_domain_error_has_its_own_answer() -> None:
    """Not its base's: a new error type falling back to `Exception` would answer as a bug."""
    types = {value for value in vars(errors).values()
             if isinstance(value, type) and issubclass(value, errors.DomainError)}
    assert types - {errors.DomainError} <= set(api.ANSWERS)


def test_the_cli_knows_exactly_the_kinds_the_api_gives() -> None:
    assert set(exits.EXIT_CODES) == {kind for _, kind in api.ANSWERS.values()}


def test_a_kind_the_cli_does_not_know_is_a_failure() -> None:
    """A newer controller's kind, or none (an older controller's)."""
    assert exits.for_kind("a-kind-from-later") == exits.for_kind(None) == exits.EXIT_FAILED


def test_an_error_not_listed_answers_as_its_nearest_base() -> None:
    class Busy(errors.Conflict):
        pass

    assert api.answer(Busy("x")) == (409, "conflict")
    assert api.answer(KeyError("x")) == (500, "internal")


def test_docs_api_lists_every_status_and_kind() -> None:
    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    table = page.split("| status | `kind` | when | example `error` |", 1)[1].split("\n\n")[0]
    documented = set(re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \|", table, re.MULTILINE))
    assert documented == {(str(status), kind) for _, status, kind, _ in CONTRACT}


async def _on_the_wire(raised: list[Exception]) -> list[tuple[int, Any]]:
    """What an HTTP client gets for each of `raised`, from the API's own server."""
    routes: api.Routes = []
    for number, error in enumerate(raised):
        async def fail(owner: object, request: api.Request, error: Exception = error) -> Any:
            raise error

        api.route("GET", f"/{number}", routes)(fail)
    server = await api.serve_tcp("127.0.0.1", 0, None, routes)
    port = server.server.sockets[0].getsockname()[1]

    def get(path: str) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    try:
        return [await asyncio.to_thread(get, f"/{n}") for n in range(len(raised))]
    finally:
        await server.close()


def test_every_error_goes_on_the_wire_with_its_status_and_kind() -> None:
    """Including those no route of the controller raises today (a DoesNotLoad outside a
    preflight, a bug): the server's path, not only the table."""
    answers = asyncio.run(_on_the_wire([error for error, *_ in CONTRACT]))
    for (error, status, kind, _), got in zip(CONTRACT, answers, strict=True):
        message = f"internal error: {error}" if kind == "internal" else str(error)
        assert got == (status, {"error": message, "kind": kind})


def test_an_operation_while_the_controller_stops_is_unavailable(
        make_service: MakeService) -> None:
    """503 `unavailable`, and the CLI exits 1: not a wrong request, a moment to wait out.
    on_stop holds the stop until the test releases it, so that the CLI's own start-up
    cannot outlast the window."""
    service = make_service(ON_STOP_WAITS_FOR_RELEASE)
    with service.harness() as h:
        h.wait_ready(30)
        h.signal_controller(signal.SIGTERM)
        service.wait_probe("on_stop web_IN_0")
        with pytest.raises(ApiError) as refused:
            h.client.maintain("restart", ["web/0"])
        assert (refused.value.status, refused.value.kind) == (503, "unavailable")
        done = rolehost("restart", "web/0", "--run-dir", str(h.run_dir.path))
        assert done.returncode == 1, done.stderr
        assert "the controller is stopping: no operation starts now" in done.stderr
        (service.toml.parent / "release").touch()
        assert h.wait_controller_exit(30) == 0
