"""The control API: HTTP/1.1 + JSON on a Unix socket (0600, in a 0700 run directory).

A thin skin over the controller's operations: each route parses its input, calls one
`Controller` method and returns its result as JSON. Errors are JSON objects with an
`error` message and a `kind`, and a 4xx/5xx status: the operations raise the domain's
errors (errors.py), and `ANSWERS` is the one place that says how each is answered. A
failing handler never stops the server.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import httptools
import structlog

from rolehost.fabric.errors import (
    Conflict,
    DoesNotLoad,
    Invalid,
    NotFound,
    OperationFailed,
    RefusedInPreflight,
    Unavailable,
)

if TYPE_CHECKING:
    from rolehost.fabric.controller import Controller

log = structlog.get_logger()
MAX_BODY = 1024 * 1024
# A request target longer than this is answered 414, and the connection closed: the
# routes' are a few dozen bytes, and nothing else bounds what the parser would keep
# (the metrics listener may face a network). nginx's and Apache's default.
MAX_URL = 8 * 1024
SHOWN = 100  # characters of a path an error message repeats at most


class MethodNotAllowed(Exception):
    """A known path asked with another method: HTTP's own refusal, not the domain's."""


class TooLarge(Exception):
    """A body over MAX_BODY."""


class UrlTooLong(Exception):
    """A request target over MAX_URL."""


# How the API answers each error a request can end with: its status, and the `kind` that
# goes with the message, for a client (the CLI's exit codes) to tell errors apart by more
# than their status: a 409 is a conflict or a preflight refusal, a 500 an operation that
# failed or a bug. A type not listed answers as its nearest listed base: `Exception` is
# a bug. A status of None is the status of the error's reason: a preflight refusal says
# why with the status (404, 409, 422), and what it was with its kind.
ANSWERS: dict[type[Exception], tuple[int | None, str]] = {
    Invalid: (400, "invalid"),
    NotFound: (404, "not-found"),
    MethodNotAllowed: (405, "not-allowed"),
    Conflict: (409, "conflict"),
    TooLarge: (413, "too-large"),
    UrlTooLong: (414, "too-large"),
    DoesNotLoad: (422, "does-not-load"),
    OperationFailed: (500, "failed"),
    Unavailable: (503, "unavailable"),
    RefusedInPreflight: (None, "preflight"),
    Exception: (500, "internal"),  # a bug: logged, and the message says so
}


def answer(error: Exception) -> tuple[int, str]:
    """The status and the kind the API answers `error` with (ANSWERS)."""
    status, kind = next(ANSWERS[base] for base in type(error).__mro__ if base in ANSWERS)
    if status is None:
        assert isinstance(error, RefusedInPreflight)
        status = answer(error.reason)[0]
    return status, kind


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as exc:
            raise Invalid(f"body is not JSON: {exc}") from None
        except RecursionError:  # the decoder's nesting, deeper than the stack allows
            raise Invalid("body is not JSON this API takes: nested too deeply") from None
        if not isinstance(data, dict):
            raise Invalid("body must be a JSON object")
        return data


@dataclass
class Raw:
    """A response that is not JSON (the metrics' text exposition)."""

    content_type: str
    body: bytes


Handler = Callable[["Controller", Request], Awaitable[Any]]
Routes = list[tuple[str, list[str], Handler]]
_ROUTES: Routes = []  # the control API, on the Unix socket only
_METRICS_ROUTES: Routes = []  # what the optional TCP metrics listener serves: nothing else


def route(method: str, pattern: str, table: Routes = _ROUTES) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        table.append((method, pattern.strip("/").split("/"), handler))
        return handler

    return register


def shown(path: str) -> str:
    """`path` as an error message repeats it: the first SHOWN characters."""
    return path if len(path) <= SHOWN else f"{path[:SHOWN]}... ({len(path)} characters)"


def _match(method: str, path: str, routes: Routes) -> tuple[Handler, dict[str, str]]:
    parts = path.strip("/").split("/")
    allowed = []
    for route_method, pattern, handler in routes:
        if len(pattern) != len(parts):
            continue
        params = {}
        for want, got in zip(pattern, parts, strict=True):
            if want.startswith("{"):
                params[want.strip("{}")] = unquote(got)
            elif want != got:
                break
        else:
            if route_method == method:
                return handler, params
            allowed.append(route_method)
    if allowed:
        raise MethodNotAllowed(f"{method} not allowed on {shown(path)} "
                               f"(allowed: {', '.join(allowed)})")
    raise NotFound(f"no such endpoint: {shown(path)}")


@route("GET", "/v1/status")
async def _status(controller: Controller, request: Request) -> Any:
    return controller.status(request.query.get("slot", ["production"])[0])


@route("GET", "/v1/instances/{name}")
async def _instance(controller: Controller, request: Request) -> Any:
    slot = request.query.get("slot", ["production"])[0]
    return controller.instance(request.params["name"], slot).snapshot()


@route("POST", "/v1/instances/{name}/status-check")
async def _status_check(controller: Controller, request: Request) -> Any:
    instance = controller.instance(request.params["name"])
    if not instance.check_status():
        raise Conflict(f"{instance.id} has no running host ({instance.state.value})")
    return {"requested": True}


def _since(request: Request) -> int:
    since = request.query.get("since", ["0"])[0]
    # ASCII digits, and few: str.isdigit() takes "²", which int() refuses, and int()
    # refuses more than 4,300 digits.
    if not (since.isascii() and since.isdigit() and len(since) <= 18):
        raise Invalid("since must be a non-negative integer")
    return int(since)


@route("GET", "/v1/events")
async def _events(controller: Controller, request: Request) -> Any:
    return controller.events(_since(request))


@route("POST", "/v1/operations/{operation}")
async def _maintain(controller: Controller, request: Request) -> Any:
    from rolehost.fabric.disks import Maintenance

    try:
        kind = Maintenance(request.params["operation"])
    except ValueError:
        raise NotFound(f"no such operation: {request.params['operation']}") from None
    if kind in (Maintenance.START, Maintenance.DEPLOY):
        raise NotFound(f"no such operation: {kind.value} (start: instances start with the "
                       "controller; deploy: rolehost deploy VERSION)")
    body = request.json()
    names, wait = body.get("instances"), body.get("wait", False)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise Invalid("instances must be a list of instance names")
    if not isinstance(wait, bool):
        raise Invalid("wait must be true or false")
    cause = str(body.get("cause") or "requested through the control API")
    return await controller.maintain(kind, names, wait, cause, _slot(body))


@route("POST", "/v1/upgrades/{kind}")
async def _upgrade(controller: Controller, request: Request) -> Any:
    from rolehost.fabric.disks import Upgrade

    try:
        upgrade = Upgrade(request.params["kind"])
    except ValueError:
        known = ", ".join(u.value for u in Upgrade)
        raise NotFound(f"no such upgrade: {request.params['kind']} ({known})") from None
    body = request.json()
    manual = body.get("manual", False)
    if not isinstance(manual, bool):
        raise Invalid("manual must be true or false")
    return await controller.upgrade(upgrade, manual, _slot(body))


@route("POST", "/v1/packages")
async def _package(controller: Controller, request: Request) -> Any:
    body = request.json()
    version, source = body.get("version"), body.get("source")
    if version is not None and not isinstance(version, str):
        raise Invalid("version must be a string")
    if source is not None and not (isinstance(source, str) and os.path.isabs(source)):
        raise Invalid("source must be the absolute path of a definition file")
    return await asyncio.to_thread(controller.package, version,
                                   Path(source) if source is not None else None)


@route("GET", "/v1/packages")
async def _packages(controller: Controller, request: Request) -> Any:
    return controller.packages.list()


@route("POST", "/v1/deploy/{version}")
async def _deploy(controller: Controller, request: Request) -> Any:
    body = request.json()
    rollback, manual = body.get("rollback", True), body.get("manual", False)
    if not isinstance(rollback, bool) or not isinstance(manual, bool):
        raise Invalid("rollback and manual must be true or false")
    if _slot(body) == "staging":
        return await controller.slots.deploy(request.params["version"])
    return await controller.deploy(request.params["version"], rollback, manual)


def _slot(body: dict[str, Any]) -> str:
    """The slot an operation applies to (docs/deploying.md): production by default."""
    slot = body.get("slot", "production")
    if slot not in ("production", "staging"):
        raise Invalid("slot must be production or staging")
    return str(slot)


@route("DELETE", "/v1/slots/{slot}")
async def _delete_slot(controller: Controller, request: Request) -> Any:
    return await controller.slots.delete(request.params["slot"])


@route("POST", "/v1/swap")
async def _swap(controller: Controller, request: Request) -> Any:
    return await controller.slots.swap()


@route("POST", "/v1/roles/{role}/settings")
async def _settings(controller: Controller, request: Request) -> Any:
    body = request.json()
    settings = body.get("settings")
    if not isinstance(settings, dict) or not settings:
        raise Invalid("settings must be a non-empty object of names to values")
    return await controller.configure(request.params["role"], settings,
                                      "set through the control API", slot=_slot(body))


@route("POST", "/v1/roles/{role}/instances")
async def _scale(controller: Controller, request: Request) -> Any:
    body = request.json()
    count = body.get("count")
    if not isinstance(count, int) or isinstance(count, bool):
        raise Invalid("count must be an integer")
    return await controller.scale(request.params["role"], count, "requested through the API",
                                  _slot(body))


@route("GET", "/v1/walk")
async def _walk(controller: Controller, request: Request) -> Any:
    return controller.current_walk().snapshot(_since(request))


@route("POST", "/v1/walk/{action}")
async def _walk_action(controller: Controller, request: Request) -> Any:
    walk, action = controller.current_walk(), request.params["action"]
    if action not in ("next", "abort"):
        raise NotFound(f"no such walk action: {action} (next, abort)")
    walk.next() if action == "next" else walk.abort()
    return walk.snapshot()


@route("GET", "/v1/operations")
async def _operations(controller: Controller, request: Request) -> Any:
    return controller.operations()


@route("GET", "/v1/metrics")
@route("GET", "/metrics", _METRICS_ROUTES)
async def _metrics(controller: Controller, request: Request) -> Any:
    from rolehost.observability import metrics

    return Raw(metrics.CONTENT_TYPE, metrics.exposition())


@route("POST", "/v1/shutdown")
async def _shutdown(controller: Controller, request: Request) -> Any:
    await controller.shutdown("stop requested through the control API")
    return {"stopped": True, "cut_short": controller.cut_short}


@dataclass
class _Parsed:
    """One request as parsed, waiting for its turn to be answered."""

    method: str
    url: bytes
    body: bytes
    too_large: bool
    keep_alive: bool
    error: Exception | None = None  # not a request: answered, then the connection closes


class _Connection(asyncio.Protocol):
    """One client connection; requests on it are answered in order. `owner` is what the
    routes' handlers are given: the controller, or run-instance's instance."""

    def __init__(self, owner: Any, pending: set[asyncio.Task[None]], routes: Routes) -> None:
        self.owner = owner
        self.pending = pending
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._body = bytearray()
        self._too_large = False
        # Parsed and not yet answered: one read can hold several pipelined requests (the
        # end of a large body and the next request, say), and pausing the transport does
        # not stop the parser within that read.
        self._queue: collections.deque[_Parsed] = collections.deque()
        self._answering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._enqueue(_Parsed("", b"", b"", False, False,
                                  Invalid("upgrade is not supported here")))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback raised, if it did
            self._enqueue(_Parsed("", b"", b"", False, False, cause if isinstance(
                cause, UrlTooLong) else Invalid(f"malformed request: {exc}")))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._body, self._too_large = b"", bytearray(), False

    def on_url(self, url: bytes) -> None:
        if len(self._url) + len(url) > MAX_URL:  # raised through the parser: parsing stops
            raise UrlTooLong(f"request target longer than {MAX_URL} bytes")
        self._url += url

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > MAX_BODY:
            self._too_large = True
        else:
            self._body += body

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():  # refused, not run: httptools raises next
            return
        method = self.parser.get_method().decode("ascii", "replace")
        self._enqueue(_Parsed(method, self._url, bytes(self._body), self._too_large,
                              bool(self.parser.should_keep_alive())))

    def _enqueue(self, parsed: _Parsed) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # one request at a time, answered in order
        self._queue.append(parsed)
        if not self._answering:
            self._answering = True
            task = asyncio.get_running_loop().create_task(self._answer_queued())
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _answer_queued(self) -> None:
        try:
            while self._queue:
                parsed = self._queue.popleft()
                if parsed.error is not None:
                    self._reply_error(parsed.error, keep_alive=False)
                else:
                    await self._answer(parsed)
                if not parsed.keep_alive:
                    self._queue.clear()  # the connection is closed: nobody to answer
                    return
        finally:
            self._answering = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def _answer(self, parsed: _Parsed) -> None:
        method, keep_alive = parsed.method, parsed.keep_alive
        path = ""
        try:
            try:  # urlsplit refuses what looks like a broken IPv6 authority: //[x/...
                url = urlsplit(parsed.url.decode("utf-8", "replace"))
            except ValueError as exc:
                raise Invalid(f"malformed request target: {exc}") from None
            path = url.path
            if parsed.too_large:
                raise TooLarge(f"body larger than {MAX_BODY} bytes")
            handler, params = _match(method, path, self.routes)
            request = Request(method, path, parse_qs(url.query), parsed.body, params)
            payload = await handler(self.owner, request)
        except Exception as exc:
            if answer(exc) == ANSWERS[Exception]:
                log.exception("api_error", method=method, path=shown(path))
            self._reply_error(exc, keep_alive)
        else:
            self._reply(200, payload, keep_alive)

    def _reply_error(self, error: Exception, keep_alive: bool) -> None:
        status, kind = answer(error)
        bug = (status, kind) == ANSWERS[Exception]
        message = f"internal error: {error}" if bug else str(error)
        self._reply(status, {"error": message, "kind": kind}, keep_alive)

    def _reply(self, status: int, payload: Any, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(payload, Raw):
            body, content_type = payload.body, payload.content_type
        else:
            body, content_type = json.dumps(payload, default=str).encode(), "application/json"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        if not keep_alive:
            self.transport.close()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 414: "URI Too Long",
            500: "Internal Server Error",
            503: "Service Unavailable"}


class Server:
    """The listening socket and the requests being answered."""

    def __init__(self, server: asyncio.AbstractServer, pending: set[asyncio.Task[None]]) -> None:
        self.server, self.pending = server, pending

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening; let requests in flight (a `stop`'s own answer) finish."""
        self.server.close()
        if self.pending:
            await asyncio.wait(self.pending, timeout=timeout)


async def serve(path: Path, controller: Controller) -> Server:
    """Listen on the Unix socket `path`, created 0600 whatever the umask."""
    import socket

    path.unlink(missing_ok=True)  # a stale socket of a controller that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(
        lambda: _Connection(controller, pending, _ROUTES), sock=sock)
    return Server(server, pending)


async def serve_metrics(host: str, port: int, controller: Controller) -> Server:
    """The metrics alone over TCP, for a Prometheus that cannot reach the Unix socket."""
    return await serve_tcp(host, port, controller, _METRICS_ROUTES)


async def serve_tcp(host: str, port: int, owner: Any, routes: Routes) -> Server:
    """Answer `routes` over TCP, their handlers given `owner` (run-instance's health
    endpoints are given the instance); OSError if `host:port` cannot be listened on."""
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(owner, pending, routes), host, port)
    return Server(server, pending)
