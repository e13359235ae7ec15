"""Shared pieces of the fault matrix (tests/faults/): role snippets, the bystander check,
process checks."""

from __future__ import annotations

import textwrap
import time

import psutil

from rolehost.testing import ServiceHarness, wait_until
from support.roles import HTTP_SITE

# Small back-off so that a recycle is quick; the crash-loop tests set their own.
FAST = {"backoff_initial": "100ms", "backoff_max": "800ms", "stable_after": "60s"}

# Role-side helpers, prepended to a test's role source (after support.roles.PRELUDE).
ROLE_HELPERS = '''
def once(tag):
    """True the first time this instance gets here, across its boots and hosts."""
    path = f"{RoleEnvironment.get_setting('probe')}.{RoleEnvironment.current_instance.id}.{tag}"
    if os.path.exists(path):
        return False
    open(path, "w").close()
    return True

def faulty():
    """The fault is injected in instance 0 only; instance 1 is the bystander."""
    return RoleEnvironment.current_instance.index == 0

def flag(name):
    return os.path.exists(RoleEnvironment.get_setting("probe") + "." + name)
'''

# The test site of the fault matrix, on HTTP_SITE: a test's source defines `healthy()`
# (for /healthz) and `answer(handler)` (for every other path).
WEB = HTTP_SITE + '''
class Handler(Site):
    def do_GET(self):
        if self.path == "/healthz":
            ok = healthy()
            return self.reply(200 if ok else 503, b"ok" if ok else b"sick")
        answer(self)

def healthy():
    return True

def answer(handler):
    handler.reply(200, RoleEnvironment.current_instance.id.encode())

class Role(RoleEntryPoint):
    def on_start(self):
        self.server = serve(Handler)
        return True

    def on_stop(self):
        self.server.shutdown()
'''


def role(source: str, web: bool = False) -> str:
    """A role module: the helpers, the web server if asked, then the test's own code."""
    return ROLE_HELPERS + (WEB if web else "") + textwrap.dedent(source)


def endpoint(port: int, **options: str) -> str:
    """The TOML of the role's `http` endpoint."""
    lines = ["[roles.web.endpoints.http]", f"port = {port}", *(
        f"{key} = {value}" for key, value in options.items())]
    return "\n".join(lines) + "\n"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def instance_pids(h: ServiceHarness, name: str) -> set[int]:
    """The live processes of one instance: its host, and every process that carries the
    instance's id in its environment (its children, detached ones, its startup tasks)."""
    instance_id = name.replace("/", "_IN_")
    pids = {p.pid for p in h.processes() if _env(p).get("ROLEHOST_INSTANCE_ID") == instance_id}
    host = h.instance(name)["pid"]
    return pids | ({host} if host else set())


def _env(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def wait_gone(pids: set[int], timeout: float = 10.0, what: str = "the processes") -> None:
    wait_until(lambda: not [p for p in pids if alive(p)], timeout, f"{what} to be gone",
               lambda: f"still alive: {sorted(p for p in pids if alive(p))}")


def timed_status(h: ServiceHarness) -> float:
    """How long one status call of the control API takes, in seconds."""
    began = time.perf_counter()
    h.status()
    return time.perf_counter() - began


def state_events(h: ServiceHarness, instance_id: str, state: str) -> list[dict[str, object]]:
    return [e for e in h.events()
            if e["event"] == "state" and e.get("instance") == instance_id
            and e.get("state") == state]


class Bystander:
    """The instance that no fault touches: it must stay ready in the same host process,
    and the control API must keep answering, whatever happens to its neighbour."""

    def __init__(self, h: ServiceHarness, name: str = "web/1") -> None:
        self.h, self.name = h, name
        row = h.wait_state(name, "ready", 30)
        self.pid: int = row["pid"]
        self.children = instance_pids(h, name)

    def check(self) -> None:
        took = timed_status(self.h)
        assert took < 1.0, f"the control API took {took:.3f}s to answer"
        row = self.h.instance(self.name)
        assert (row["state"], row["pid"], row["restarts"]) == ("ready", self.pid, 0), row
        assert all(alive(p) for p in self.children), "the bystander lost a process"


def wait_pids(h: ServiceHarness, name: str, count: int, timeout: float = 10.0) -> set[int]:
    """Wait until the instance has at least `count` live processes; return them."""

    def enough() -> set[int] | None:
        pids = instance_pids(h, name)
        return pids if len(pids) >= count else None

    return wait_until(enough, timeout, f"{count} processes of {name}",
                      lambda: str(sorted(instance_pids(h, name))))


# A role whose on_stop hangs, once, in the faulty instance; it holds a child process.
HANGING_ON_STOP = """
class Role(RoleEntryPoint):
    def on_start(self):
        self.child = subprocess.Popen(["sleep", "600"])
        return True
    def on_stop(self):
        if faulty() and once("stop"):
            probe("on_stop:hanging")
            time.sleep(600)
"""
