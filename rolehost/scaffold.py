"""`rolehost init`: a service that works at once, written into a folder.

Three files: `rolehost.toml` with comments, a role module, and a pytest file that
rehearses a restart and a reimage with `rolehost.testing`. The result passes `rolehost
check`, and `rolehost start` runs it. Nothing existing is ever overwritten: if any of
the three files is there, nothing is written.

The web role's application uses no framework (a plain ASGI or WSGI callable): it runs
wherever `rolehost[web]` is installed, and docs/web-roles.md shows the same role with
FastAPI, Django and Flask.
"""

from __future__ import annotations

import re
from pathlib import Path

ROLES = ("worker", "web")
SITES = ("asgi", "wsgi")
PORT = 8080  # the web role's public port, the balancer's


class ScaffoldError(Exception):
    """The scaffold cannot be written; nothing was."""


def service_name(folder: Path) -> str:
    """A valid service name from the folder's: letters, digits, `_` and `-`, a letter first."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.resolve().name).strip("-_")[:63]
    return name if re.match(r"^[A-Za-z]", name) else f"service-{name}".rstrip("-")[:63]


def files(name: str, role: str, site: str) -> dict[str, str]:
    """The files of a new service, by name."""
    if role == "worker":
        return {"rolehost.toml": WORKER_TOML.format(name=name), "worker.py": WORKER,
                "test_service.py": WORKER_TEST}
    application = ASGI_APP if site == "asgi" else WSGI_APP
    return {"rolehost.toml": WEB_TOML.format(name=name, site=site, port=PORT),
            "web.py": WEB_ROLE.format(application=application),
            "test_service.py": WEB_TEST}


def init(folder: Path, role: str = "worker", site: str = "asgi") -> list[Path]:
    """Write a new service into `folder` (made if missing); the paths written."""
    if role not in ROLES or site not in SITES:
        raise ScaffoldError(f"expected --role {'|'.join(ROLES)} and --site {'|'.join(SITES)}")
    wanted = {folder / file: text for file, text in files(service_name(folder), role, site).items()}
    if existing := [str(path) for path in wanted if path.exists() or path.is_symlink()]:
        raise ScaffoldError("refusing to overwrite " + ", ".join(existing)
                            + ": nothing was written")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in wanted.items():
        with path.open("x", encoding="utf-8") as file:  # "x": one made meanwhile is kept
            file.write(text)
        written.append(path)
    return written


WORKER_TOML = '''\
# The service definition: `rolehost check` validates and rehearses it, `rolehost start`
# runs it. Every key is in docs/configuration.md.
[service]
name = "{name}"
# Instance i is in update domain i % upgrade_domains: upgrades and deploys take one
# domain down at a time, so the others keep working.
upgrade_domains = 2

[roles.worker]
# module:Class, importable from this folder: the role's RoleEntryPoint.
entry_point = "worker:Worker"
# How many host processes run the role.
instances = 2
# How long the `stopping` handlers plus on_stop may take before the instance is killed.
stop_timeout = "30s"

# Read in the role with RoleEnvironment.get_setting("interval"); `rolehost config set`
# changes them while the service runs.
[roles.worker.settings]
interval = 1.0
'''

WORKER = '''\
"""The worker role: does a unit of work every `interval` seconds, stops cleanly."""

from rolehost import RoleEntryPoint, RoleEnvironment


class Worker(RoleEntryPoint):
    def on_start(self) -> bool:
        # Warm up here; return False (or raise) to have the instance recycled.
        self.interval = float(RoleEnvironment.get_setting("interval"))
        self.done = 0
        return True

    def run(self) -> None:
        # The instance's main loop. wait_for_stop doubles as the timer: it returns True
        # as soon as a stop begins.
        me = RoleEnvironment.current_instance
        while not RoleEnvironment.wait_for_stop(self.interval):
            self.done += 1
            print(f"{me.id}: unit of work #{self.done}")

    def on_stop(self) -> None:
        # Within stop_timeout: finish or hand back what is in progress.
        print(f"{RoleEnvironment.current_instance.id}: stopped after {self.done} units")
'''

WORKER_TEST = '''\
"""The service, rehearsed as the platform will treat it: a restart, a reimage."""

from pathlib import Path

from rolehost.testing import ServiceHarness, wait_until

HERE = Path(__file__).parent


def test_the_worker_survives_a_restart_and_a_reimage() -> None:
    with ServiceHarness(HERE / "rolehost.toml") as service:
        service.wait_ready(timeout=60)
        wait_until(lambda: "unit of work #1" in service.logs("worker/0"), 30, "some work")

        [row] = service.restart("worker/0")
        assert row["state"] == "ready"
        [row] = service.reimage("worker/1")
        assert row["state"] == "ready"

        service.stop()
        assert "stopped after" in service.logs("worker/0")
'''

WEB_TOML = '''\
# The service definition: `rolehost check` validates and rehearses it, `rolehost start`
# runs it. Every key is in docs/configuration.md; web roles in docs/web-roles.md.
[service]
name = "{name}"
# Instance i is in update domain i % upgrade_domains: upgrades and deploys take one
# domain down at a time, so the other keeps serving.
upgrade_domains = 2

[roles.web]
# Optional for a role with a site: a RoleEntryPoint for on_start, on_stop and status
# checks beside it. Without it, the site is the whole role.
entry_point = "web:Web"
instances = 2
# How long the site's shutdown, the `stopping` handlers and on_stop may take in all.
stop_timeout = "30s"

# The application the host serves (in uvicorn): asgi = "module:app" or wsgi = "...".
[roles.web.site]
{site} = "web:app"
# Requested (GET, 2xx or 3xx) after on_start and before the instance is ready.
warmup = ["/"]

# The built-in balancer listens on this port and spreads requests over the instances
# in rotation; each instance's site binds a private port of its own.
[roles.web.endpoints.http]
port = {port}
# An instance enters rotation when this path answers 2xx or 3xx.
probe = {{ path = "/healthz", interval = "1s" }}
# A stopping instance leaves rotation, then has this long to finish its requests.
drain_timeout = "10s"
'''

ASGI_APP = '''\
async def app(scope, receive, send):
    """A plain ASGI application (FastAPI's or Starlette's `app` takes its place)."""
    if scope["type"] == "lifespan":  # startup and shutdown, once per instance
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = page(scope["path"]).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
'''

WSGI_APP = '''\
def app(environ, start_response):
    """A plain WSGI application (Flask's `app` or Django's `application` takes its place)."""
    body = page(environ["PATH_INFO"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
'''

WEB_ROLE = '''\
"""The web role: its application, and the RoleEntryPoint beside it."""

from rolehost import RoleEntryPoint, RoleEnvironment


def page(path: str) -> str:
    if path == "/healthz":
        return "ok"
    return f"hello from {{RoleEnvironment.current_instance.id}}\\n"


{application}


class Web(RoleEntryPoint):
    def on_start(self) -> bool:
        # Runs once the site listens, before the warm-up requests.
        print(f"{{RoleEnvironment.current_instance.id}}: starting")
        return True

    def on_stop(self) -> None:
        # After the site has finished its requests and shut down.
        print(f"{{RoleEnvironment.current_instance.id}}: stopped")
'''

WEB_TEST = '''\
"""The service, rehearsed as the platform will treat it: a restart and a reimage under
steady load, with no failed request."""

from pathlib import Path

from rolehost.testing import LoadProbe, ServiceHarness

HERE = Path(__file__).parent


def test_the_site_serves_through_a_restart_and_a_reimage() -> None:
    with ServiceHarness(HERE / "rolehost.toml") as service:
        service.wait_ready(timeout=60)
        with LoadProbe(service.url("web", "http")) as load:
            load.wait_requests(20)
            [row] = service.restart("web/0")
            assert row["state"] == "ready"
            [row] = service.reimage("web/1")
            assert row["state"] == "ready"
            load.wait_requests(load.requests + 20)
        assert load.failures == [], load.report()
'''
