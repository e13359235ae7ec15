"""The portal's web application (Starlette), behind its guard, and the server (uvicorn)
that runs it. Every page asks the control API through `Source`, on a worker thread: the
client blocks, and a slow controller must not stall the other pages."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rolehost.client import ApiError, ControllerNotRunning
from rolehost.fabric.names import instance_id, parse_instance_name
from rolehost.observability import logs, output
from rolehost.portal import actions, pages
from rolehost.portal.guard import Guard
from rolehost.portal.source import Source

STATIC = Path(__file__).parent / "static"
LOG_LINES = 200
MAX_READ = 256 * 1024  # of a log, per request: a page following a busy log catches up


def _down(exc: Exception) -> HTMLResponse:
    return HTMLResponse(f"<p class='down'>The controller does not answer: {exc}</p>",
                        status_code=503)


def build(source: Source, token: str) -> Starlette:
    """The application, unguarded (`guarded` puts the guard in front)."""

    async def call(fn: Any, *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    async def service(request: Request) -> Response:
        try:
            status = await call(source.status)
            staging = await call(source.staging, status)
            packages = await call(source.client.packages)
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)
        return HTMLResponse(pages.service(status, staging, packages, token))

    async def part_instances(request: Request) -> Response:
        try:
            status = await call(source.status)
            return HTMLResponse(pages.slots(status, await call(source.staging, status)))
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)

    async def part_walk(request: Request) -> Response:
        try:
            status = await call(source.status)
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)
        walk = status.get("walk")
        began = time.time() - (walk["seconds"] + 5 if walk else 0)
        events = await call(source.events_between, began, time.time())
        return HTMLResponse(pages.walk_part(status, events,
                                            source.samples_between(began, time.time())))

    async def history(request: Request) -> Response:
        try:
            return HTMLResponse(pages.history(await call(source.client.operations), token))
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)

    async def operation(request: Request) -> Response:
        wanted = request.path_params["op"]
        try:
            summary = await call(source.client.operations)
            status = await call(source.status)
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)
        op = next((o for o in summary["operations"] if o["id"] == wanted), None)
        if op is None:
            return HTMLResponse(pages.page("not found", token,
                                           "<p>No such operation in the history.</p>"), 404)
        ended = op["ended"] or time.time()
        events = await call(source.events_between, op["started"] - 1, ended + 1)
        samples = source.samples_between(op["started"] - 1, ended + 1)
        return HTMLResponse(pages.operation(op, status, events, samples, token))

    def _log_path(request: Request) -> tuple[Path, Any] | None:
        name = request.query_params.get("instance")
        if not name:
            return source.run_dir.logs / "controller.log", logs.render_event
        try:
            role, index = parse_instance_name(name)
        except ValueError:
            return None
        return source.run_dir.instance_log(instance_id(role, index)), output.render

    async def log_page(request: Request) -> Response:
        try:
            status = await call(source.status)
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)
        names = [i["id"] for i in status["instances"]]
        shown = request.query_params.get("instance")
        if shown is not None and _log_path(request) is None:
            return HTMLResponse(pages.page("not found", token, "<p>No such instance.</p>"), 404)
        return HTMLResponse(pages.log_page(names, shown, token))

    async def part_log(request: Request) -> Response:
        found = _log_path(request)
        if found is None:
            return JSONResponse({"error": "no such instance"}, 404)
        path, render = found
        offset = request.query_params.get("offset", "")
        return JSONResponse(await call(_read_log, path, render,
                                       int(offset) if offset.isdigit() else None))

    async def metrics_page(request: Request) -> Response:
        return HTMLResponse(pages.metrics_page(token))

    async def part_metrics(request: Request) -> Response:
        try:
            await call(source.status)  # takes a sample
        except (ControllerNotRunning, ApiError) as exc:
            return _down(exc)
        return HTMLResponse(pages.charts(source.samples_between(0, time.time())))

    async def act(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"lines": [], "failure": "the body must be a JSON object"}, 400)
        return JSONResponse(await call(actions.act, source, request.path_params["action"], body))

    async def follow(request: Request) -> Response:
        since = request.query_params.get("since", "0")
        seq = int(since) if since.isdigit() else 0
        try:
            if request.path_params["what"] == "walk":
                return JSONResponse(await call(actions.follow_walk, source, seq))
            names = [n for n in request.query_params.get("names", "").split(",") if n]
            slot = request.query_params.get("slot", "production")
            return JSONResponse(await call(actions.follow_instances, source, names, seq, slot))
        except (ControllerNotRunning, ApiError) as exc:
            return JSONResponse({"lines": [], "failure": str(exc), "done": True}, 503)

    return Starlette(routes=[
        Route("/", service), Route("/part/instances", part_instances),
        Route("/part/walk", part_walk), Route("/history", history),
        Route("/timeline/{op}", operation), Route("/logs", log_page),
        Route("/part/log", part_log), Route("/metrics", metrics_page),
        Route("/part/metrics", part_metrics),
        Route("/act/{action:path}", act, methods=["POST"]),
        Route("/follow/{what}", follow),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])


def _read_log(path: Path, render: Any, offset: int | None) -> dict[str, Any]:
    """The lines of `path` after byte `offset` (its last LOG_LINES without one), and the
    offset to ask from next. A file shorter than the offset was rotated: read it anew."""
    if not path.exists():
        return {"lines": [], "offset": 0}
    size = path.stat().st_size
    if offset is None:
        return {"lines": [render(line) for line in logs.tail(path, LOG_LINES)], "offset": size}
    if offset > size:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(MAX_READ)
    complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits
    lines = complete.decode("utf-8", "replace").splitlines()
    return {"lines": [render(line) for line in lines], "offset": offset + len(complete)}


def guarded(source: Source, token: str, host: str, port: int) -> Guard:
    return Guard(build(source, token), token, host, port)


def serve(source: Source, token: str, host: str, port: int, on_listening: Any) -> None:
    """Run the portal until interrupted; `on_listening(port)` once it listens (the port
    the system gave when `port` was 0)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections wait in the backlog from the moment the address is printed
    port = sock.getsockname()[1]
    config = uvicorn.Config(guarded(source, token, host, port), log_level="warning",
                            access_log=False, lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    on_listening(port)
    server.run(sockets=[sock])
