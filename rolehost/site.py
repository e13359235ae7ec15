"""A web role's site, served inside its host process (the platform's IIS beside the role).

The application, ASGI or WSGI, runs in uvicorn: a proven server, whose HTTP parsing,
keep-alive, graceful shutdown and lifespan protocol rolehost does not write again. A WSGI
application is served by the same server through a2wsgi, which runs it on a thread
pool: one server, one drain, one access log for both kinds (waitress, the usual embedded
WSGI server, closes its connections at once when it is closed: it has no graceful
shutdown to finish the requests in flight).

uvicorn runs on a thread of its own, with an event loop of its own, and never installs
signal handlers: the host's stop is the only stop, and SIGTERM stays the controller's.

The host drives it: `start()` before on_start (the site is listening, its lifespan
started, when on_start runs), `warm_up()` after it, `stop()` first in a graceful stop.
Its access log goes to stdout and its errors to stderr, which the controller writes to
the instance log in the service's `instance_log_format`.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from rolehost.environment import Context

# How long a started server may take to bind and run its lifespan startup is the ready
# deadline's business (the controller's): the host waits for as long as it takes.
_KEEP_ALIVE_MARGIN = 5.0  # the balancer closes an idle connection before the site does
_BODY_HEAD = 200  # bytes of a failed warm-up's answer that the error shows


class SiteError(Exception):
    """The site could not start or warm up; the message says where and why."""


def load_application(target: str, app_dir: str) -> Any:
    """Import `module:attribute` from the role's app folder."""
    module_name, _, attribute = target.partition(":")
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"module {module_name!r} ({getattr(module, '__file__', '?')}) "
                          f"has no attribute {attribute!r}") from None


class Site:
    """One instance's site: its server, on its own thread."""

    def __init__(self, context: Context, spec: dict[str, Any],
                 on_unexpected_exit: Callable[[str], None]) -> None:
        self.spec = spec
        self.app_dir = context.app_dir
        endpoint = context.endpoints[spec["endpoint"]]
        self.host, self.port = str(endpoint["host"]), int(endpoint["port"])
        self._on_unexpected_exit = on_unexpected_exit
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def of(cls, context: Context, on_unexpected_exit: Callable[[str], None]) -> Site | None:
        return cls(context, context.site, on_unexpected_exit) if context.site else None

    def start(self) -> None:
        """Import the application, bind the private port, run the lifespan startup; return
        once the server accepts connections. An error of the application's raises it."""
        import uvicorn

        application = load_application(self.spec["application"], self.app_dir)
        if self.spec["interface"] == "wsgi":
            from a2wsgi import WSGIMiddleware

            application = WSGIMiddleware(application)
        idle = float(self.spec["idle_timeout"])
        config = uvicorn.Config(
            application, host=self.host, port=self.port,
            # A WSGI application behind a2wsgi has no lifespan; an ASGI one that does not
            # speak it is served without (uvicorn's "auto").
            lifespan="off" if self.spec["interface"] == "wsgi" else "auto",
            interface="asgi3" if self.spec["interface"] == "wsgi" else "auto",
            timeout_graceful_shutdown=max(1, round(float(self.spec["drain_timeout"]))),
            # Longer than the balancer's idle timeout: the balancer closes an idle kept
            # alive connection first, and never sends a request on one the site closes.
            timeout_keep_alive=round(idle + _KEEP_ALIVE_MARGIN) if idle > 0 else 3600,
            use_colors=False, server_header=False, proxy_headers=True,
        )
        server = _server_class()(config)
        self._server = server
        started = threading.Event()
        server.on_started = started.set
        failure: list[str] = []
        self._thread = threading.Thread(
            target=self._serve, args=(server, started, failure), name="rolehost-site",
            daemon=True)
        self._thread.start()
        started.wait()
        if failure or not server.started:
            raise SiteError(failure[0] if failure else (
                f"the {self.spec['interface'].upper()} server did not start on "
                f"{self.host}:{self.port}: its error is in the instance log"))

    def _serve(self, server: Any, started: threading.Event, failure: list[str]) -> None:
        try:
            server.run()
        except BaseException as exc:  # SystemExit: uvicorn's own for a failed startup
            if not isinstance(exc, SystemExit):
                failure.append(f"the server failed: {exc!r}")
        finally:
            started.set()
        if server.started and not self._stopping:
            self._on_unexpected_exit("the site's server stopped on its own")

    def warm_up(self) -> None:
        """GET each warm-up path in order; SiteError names the first that failed."""
        timeout = float(self.spec["warmup_timeout"])
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        for path in self.spec["warmup"]:
            connection = http.client.HTTPConnection(host, self.port, timeout=timeout)
            try:
                connection.request("GET", path, headers={"User-Agent": "rolehost-warmup"})
                response = connection.getresponse()
                body = response.read(_BODY_HEAD)
            except TimeoutError:
                raise SiteError(f"warm-up GET {path} did not answer within "
                                f"warmup_timeout ({timeout:g}s)") from None
            except OSError as exc:
                raise SiteError(f"warm-up GET {path} failed: {exc}") from None
            finally:
                connection.close()
            if not 200 <= response.status < 400:
                head = body.decode("utf-8", "replace").strip()
                raise SiteError(f"warm-up GET {path} answered {response.status} "
                                f"{response.reason}: {head!r}")

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight (within the endpoint's
        drain_timeout), then the lifespan shutdown; return when the server is done."""
        self._stopping = True
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join()


@functools.cache
def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, without its signal handlers, telling when it listens."""

        on_started: Callable[[], None] = staticmethod(lambda: None)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # The host's stop is the only stop: SIGINT and SIGTERM are not uvicorn's.
            yield

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            self.on_started()

    return Server

