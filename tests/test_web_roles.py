"""Web roles: real FastAPI, Django and Flask applications served by their hosts in uvicorn,
behind the built-in balancer, with real processes.

Each application is cold until its warm-up path has been requested: every other page
answers 503 until then. The definitions have no health probe, so the only thing that
keeps a cold instance out of rotation is the host's order (site, on_start, warm-up, then
ready): a request that reached a cold instance would fail the load.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from rolehost.testing import LoadProbe, ServiceHarness, run_dir_processes, wait_until
from support.cli import rolehost
from support.net import answer, free_port, get

# The role beside the FastAPI site: it writes each lifecycle step to the probe file, so
# the test can read the order of a start and of a stop.
FASTAPI_ROLE = '''
from rolehost import RoleEntryPoint, RoleEnvironment

def probe(event):
    with open(RoleEnvironment.get_setting("probe"), "a") as f:
        f.write(f"{event} {RoleEnvironment.current_instance.id}\\n")

class Web(RoleEntryPoint):
    def on_start(self):
        probe("on_start")
        RoleEnvironment.on_stopping(lambda: probe("stopping"))
        return True

    def on_stop(self):
        probe("on_stop")
'''

# A lifespan that warms a cache (and says so in the probe file), and a site that is cold
# until /warm has been asked for.
FASTAPI_APP = '''
import asyncio, contextlib
from fastapi import FastAPI, Response
from shop.roles import probe

cache = {}

@contextlib.asynccontextmanager
async def lifespan(app):
    await asyncio.sleep(0.5)
    cache["catalog"] = ["tea", "cake"]
    probe("lifespan-startup")
    yield
    probe("lifespan-shutdown")

app = FastAPI(lifespan=lifespan)
state = {"warm": False}

@app.get("/warm")
async def warm():
    assert cache["catalog"], "the lifespan did not run"
    await asyncio.sleep(0.5)
    state["warm"] = True
    return {"warmed": len(cache["catalog"])}

@app.get("/")
async def index(response: Response):
    if not state["warm"]:
        response.status_code = 503
        return "cold"
    return "warm " + ",".join(cache["catalog"])

@app.get("/slow")
async def slow():
    probe("slow-begun")
    await asyncio.sleep(1.5)
    probe("slow-done")
    return "slow"

@app.get("/hang")
async def hang():
    await asyncio.sleep(60)

@app.get("/broken")
async def broken(response: Response):
    response.status_code = 500
    return "cache empty"
'''

FLASK_APP = '''
import time
from flask import Flask

app = Flask(__name__)
state = {"warm": False}

@app.get("/warm")
def warm():
    time.sleep(0.5)
    state["warm"] = True
    return "warmed"

@app.get("/")
def index():
    return ("warm", 200) if state["warm"] else ("cold", 503)
'''

# A minimal Django project: settings, urls and views in one module, served through
# Django's own asgi.py entry (which does not speak the lifespan protocol).
DJANGO_PROJECT = {
    "mysite/__init__.py": "",
    "mysite/settings.py": '''
SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = []
DATABASES = {}
''',
    "mysite/urls.py": '''
import time
from django.http import HttpResponse
from django.urls import path

state = {"warm": False}

def warm(request):
    time.sleep(0.5)
    state["warm"] = True
    return HttpResponse("warmed")

def index(request):
    return HttpResponse("warm") if state["warm"] else HttpResponse("cold", status=503)

urlpatterns = [path("warm", warm), path("", index)]
''',
    "mysite/asgi.py": '''
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
from django.core.asgi import get_asgi_application
application = get_asgi_application()
''',
}


def fastapi_files() -> dict[str, str]:
    return {"shop/__init__.py": "", "shop/roles.py": FASTAPI_ROLE, "shop/web.py": FASTAPI_APP}


def web_service(tmp_path: Path, files: dict[str, str], site: str, instances: int = 2,
                entry_point: str | None = None, warmup: str = '["/warm"]',
                service: str = "", queue_timeout: str = "20s") -> tuple[Path, int]:
    """A web role in `tmp_path`: app files, its site, no health probe, small timeouts."""
    app = tmp_path / "app"
    for name, source in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(textwrap.dedent(source))
    port = free_port()
    toml = tmp_path / "rolehost.toml"
    toml.write_text(textwrap.dedent(f"""\
        [service]
        name = "web-test"
        upgrade_domains = 2
        {service}

        [roles.web]
        app = "app"
        instances = {instances}
        stop_timeout = "10s"
        {f'entry_point = "{entry_point}"' if entry_point else ""}

        [roles.web.site]
        {site}
        warmup = {warmup}

        [roles.web.endpoints.http]
        port = {port}
        drain_timeout = "2s"
        queue_timeout = "{queue_timeout}"

        [roles.web.settings]
        probe = "{tmp_path / 'probe.txt'}"
        """))
    return toml, port


def probe_lines(tmp_path: Path) -> list[str]:
    probe = tmp_path / "probe.txt"
    return probe.read_text().splitlines() if probe.exists() else []


def through_restarts(h: ServiceHarness, port: int) -> LoadProbe:
    """Steady keep-alive load through a host-os walk and a restart of each instance."""
    with LoadProbe(f"http://127.0.0.1:{port}/", clients=4) as load:
        load.wait_requests(50)
        walk = h.upgrade("host-os", timeout=120)
        assert walk["state"] == "succeeded", walk
        for name in ("web/0", "web/1"):
            h.restart(name)
        load.wait_requests(load.requests + 50)
    assert load.failures == [], load.report()
    return load


@pytest.mark.slow
def test_a_fastapi_site_is_warm_before_rotation_and_stops_in_order(tmp_path: Path) -> None:
    """FastAPI with a lifespan that warms a cache: a request that comes while the service
    boots waits and is served warm; through a host-os walk and restarts under load, no
    request fails; the access log is in the instance log; a stop finishes the site's
    requests in flight, then runs the lifespan shutdown, the stopping handlers, on_stop."""
    toml, port = web_service(
        tmp_path, fastapi_files(),
        'asgi = "shop.web:app"', entry_point="shop.roles:Web")
    early: list[tuple[int, bytes]] = []
    with ServiceHarness(toml) as h:
        # Sent while the instances boot (their lifespans and warm-ups take a second):
        # the balancer holds it until one is ready, and it is served warm.
        assert not any(i["state"] == "ready" for i in h.status()["instances"])
        asker = threading.Thread(target=lambda: early.append(get(port, "/")))
        asker.start()
        h.wait_ready(60)
        asker.join(30)
        assert early == [(200, b'"warm tea,cake"')]
        through_restarts(h, port)
        # A request in flight on the site itself (not through the balancer, which has
        # drained) when its instance stops: the server finishes it before it shuts down.
        private = h.instance("web/0")["endpoints"]["http"]["port"]
        slow: list[tuple[int, bytes]] = []
        asker = threading.Thread(target=lambda: slow.append(get(private, "/slow")))
        asker.start()
        wait_until(lambda: "slow-begun web_IN_0" in probe_lines(tmp_path), 10, "/slow")
        h.restart("web/0")
        asker.join(30)
        assert slow == [(200, b'"slow"')]
        log = h.logs("web/0")
    # Each boot: the lifespan, on_start, then the warm-up request, in the access log.
    assert re.search(r'"GET /warm HTTP/1.1" 200', log), log
    mine = [line.split()[0] for line in probe_lines(tmp_path) if line.endswith(" web_IN_0")]
    boot = ["lifespan-startup", "on_start"]
    stop = ["lifespan-shutdown", "stopping", "on_stop"]
    # Booted, walked (stop + boot), restarted (stop + boot), restarted with /slow in
    # flight, then the service's stop.
    assert mine == (boot + (stop + boot) * 2 + ["slow-begun", "slow-done"] + stop + boot
                    + stop), mine


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["flask", "django"])
def test_a_wsgi_or_django_site_serves_through_restarts(tmp_path: Path, framework: str) -> None:
    """Flask (WSGI, through a2wsgi) and a minimal Django project (its asgi.py, which
    has no lifespan): a site-only role, no Python class of the user's, 0 failed requests
    through a host-os walk and a restart of each instance; the access log is in the
    instance log as JSON lines when the service says so."""
    if framework == "flask":
        files, site = {"hello.py": FLASK_APP}, 'wsgi = "hello:app"'
    else:
        files, site = DJANGO_PROJECT, 'asgi = "mysite.asgi:application"'
    toml, port = web_service(tmp_path, files, site, service='instance_log_format = "json"')
    with ServiceHarness(toml) as h:
        h.wait_ready(60)
        assert get(port, "/") == (200, b"warm")
        through_restarts(h, port)
        raw = h.run_dir.instance_log("web_IN_1").read_text()
    # The access log, in the service's instance log format: one JSON object a line.
    lines = [json.loads(line) for line in raw.splitlines()]
    assert any('"GET /warm HTTP/1.1" 200' in line["line"] and line["stream"] == "stdout"
               and line["instance"] == "web_IN_1" for line in lines), raw[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/broken", "/hang"])
def test_a_warm_up_that_fails_fails_the_boot_out_of_rotation(tmp_path: Path,
                                                              path: str) -> None:
    """The warm-up path answers 500, or nothing within warmup_timeout: the boot fails
    with the path and the status and the body's head (or the timeout), and the instance
    never enters rotation (a request to the endpoint waits and times out in the
    balancer's queue, never reaching the cold site)."""
    toml, port = web_service(
        tmp_path, fastapi_files(),
        'asgi = "shop.web:app"\nwarmup_timeout = "1s"', instances=1,
        warmup=f'["/warm", "{path}"]', service='backoff_initial = "5s"', queue_timeout="1s")
    with ServiceHarness(toml) as h:
        def failed() -> str | None:
            error = h.instance("web/0").get("last_error") or ""
            return error if "warm-up" in error else None

        error = wait_until(failed, 30, "the warm-up's failure")
        assert error == {
            "/broken": "warmup: warm-up GET /broken answered 500 Internal Server Error: "
                       "'\"cache empty\"'",
            "/hang": "warmup: warm-up GET /hang did not answer within warmup_timeout (1s)",
        }[path], error
        status, _ = get(port, "/", timeout=30)
        assert status == 503  # the queue ran out: no instance was ever in rotation
        assert not [e for e in h.events() if e.get("event") == "rotation"
                    and e.get("in_rotation")]



def test_run_instance_serves_the_site_warm_as_kubernetes_runs_it(tmp_path: Path) -> None:
    """`rolehost run-instance` (what the Kubernetes export runs) serves a site-only role
    on the declared port, bound as a pod binds it, warm before /ready, and stops it
    through its lifespan shutdown on SIGTERM."""
    toml, port = web_service(tmp_path, fastapi_files(), 'asgi = "shop.web:app"', instances=1)
    health, run_dir = free_port(), tmp_path / "instance-run"
    controller = subprocess.Popen(
        [sys.executable, "-m", "rolehost", "run-instance", "web", "-f", str(toml),
         "--health", f"127.0.0.1:{health}", "--run-dir", str(run_dir),
         "--endpoint-host", "0.0.0.0"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answer(health, "/ready") == 200, 30, "/ready")
        assert get(port, "/") == (200, b'"warm tea,cake"')
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0
        probes = " ".join(probe_lines(tmp_path)).split()
        assert probes[::2] == ["lifespan-startup", "lifespan-shutdown"], probes
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
        for proc in run_dir_processes(run_dir):
            proc.kill()


def test_check_names_the_site_that_does_not_load_or_has_no_endpoint(tmp_path: Path) -> None:
    """`rolehost check` imports the site's application as it does the entry point, and
    names the key; a site with no endpoint to bind is a definition error. Exit 2."""
    toml, _ = web_service(tmp_path, fastapi_files(), 'asgi = "shop.web:application"')
    done = rolehost("check", "-f", str(toml))
    assert done.returncode == 2, done
    assert f"{toml}: roles.web.site.asgi: cannot load shop.web:application" in done.stderr
    assert "has no attribute 'application'" in done.stderr
    text = toml.read_text()
    toml.write_text(text[:text.index("[roles.web.endpoints.http]")])
    done = rolehost("check", "-f", str(toml))
    assert done.returncode == 2, done
    assert (f"{toml}: roles.web.site.endpoint: the role has no endpoint: declare an http "
            "endpoint for the site") in done.stderr, done.stderr
