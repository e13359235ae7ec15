"""Role sources that tests share. `make_service` (tests/conftest.py) writes a source after
PRELUDE, so a source may use PRELUDE's imports and its `probe(event)`."""

# Roles append "EVENT INSTANCE_ID" lines to the file in setting `probe`, so a test can
# see which lifecycle methods ran, in which order, in which process.
PRELUDE = '''
import asyncio, os, signal, subprocess, sys, time
from rolehost import RoleEntryPoint, RoleEnvironment, RoleStatus

def probe(event):
    with open(RoleEnvironment.get_setting("probe"), "a") as f:
        f.write(f"{event} {RoleEnvironment.current_instance.id}\\n")
'''


# A role that does nothing of its own: ready when its host is.
IDLE = "class Role(RoleEntryPoint): pass"


# A role whose on_stop holds the stop until the test touches `release` in the service's
# folder (beside the probe file), 30 s at most.
ON_STOP_WAITS_FOR_RELEASE = """
class Role(RoleEntryPoint):
    def on_stop(self):
        probe("on_stop")
        release = os.path.join(os.path.dirname(RoleEnvironment.get_setting("probe")),
                               "release")
        deadline = time.monotonic() + 30
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
"""


# A role that reports the instances of role `web` as it sees them, at start
# ("start roles=web_IN_0,web_IN_1") and after each change ("changed roles=..."), and
# the roles each topology change it is offered names ("changing web").
WATCHES_TOPOLOGY = """
from rolehost import TopologyChange

class Role(RoleEntryPoint):
    def on_start(self):
        RoleEnvironment.on_changing(self.changing)
        RoleEnvironment.on_changed(self.changed)
        probe(f"start roles={','.join(RoleEnvironment.roles['web'])}")
        return True

    def changing(self, event):
        probe("changing " + ",".join(c.role for c in event.changes
                                      if isinstance(c, TopologyChange)))

    def changed(self, changes):
        probe(f"changed roles={','.join(RoleEnvironment.roles['web'])}")
"""


# A role whose stop a second signal cuts short: a child of on_start to kill with the
# host, and (setting `during` = "on_stop") an on_stop that would hold the stop 5 minutes.
HOLDS_ITS_STOP = """
    class Role(RoleEntryPoint):
        def on_start(self):
            subprocess.Popen(["sleep", "300"])  # a child the kill must take too
            return True
        def on_stop(self):
            probe("on_stop")
            if RoleEnvironment.get_setting("during") == "on_stop":
                time.sleep(300)
    """

# A role whose on_stop overruns stop_timeout: it sleeps on (setting `overrun` =
# "host-bounds-it": the host cuts it short), or freezes its host ("host-frozen": the
# supervisor kills it).
OVERRUNS_ITS_STOP = """
    class Role(RoleEntryPoint):
        def on_stop(self):
            probe("on_stop")
            if RoleEnvironment.get_setting("overrun") == "host-frozen":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(60)
    """


# A threaded HTTP/1.1 server for a role source to build on: `Site`, a request handler
# with `reply(status, body)`; `serve(handler, endpoint)`, a server on the instance's
# endpoint (`http` unless named), started in a daemon thread; `Serving`, a role that
# serves its `handler` on its `endpoint` from on_start to on_stop (a subclass's
# on_start does its own, then returns super().on_start()).
HTTP_SITE = """
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Site(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and
    # the peer's delayed ACK hold the body about 40 ms, and a load test measures that.
    disable_nagle_algorithm = True

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True

def serve(handler, endpoint="http"):
    address = RoleEnvironment.current_instance.endpoints[endpoint]
    server = Server((address.host, address.port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

class Serving(RoleEntryPoint):
    handler = Site
    endpoint = "http"

    def on_start(self):
        self.server = serve(self.handler, self.endpoint)
        return True

    def run(self):
        RoleEnvironment.wait_for_stop()

    def on_stop(self):
        self.server.shutdown()
        self.server.server_close()
"""


# The test site: a threaded HTTP/1.1 server on the instance's `http` endpoint that answers
# its instance id, with paths for the balancer's cases (slow answers, cut bodies, upgrades,
# chunked bodies, malformed heads...). Setting `warmup` is each instance's on_start delay,
# by index ("0,3": the second is ready 3 s late). Flag files next to the probe file:
# `.busy` (the status check says busy), `.sick` (/healthz answers 503), `.garbage`
# (/healthz answers 70,000 bytes and no line end).
WEB = HTTP_SITE + """
import hashlib, socket, struct
from urllib.parse import parse_qs, urlsplit

class Handler(Site):
    connections = 0
    tunnel_end = "none"

    def setup(self):
        Handler.connections += 1
        super().setup()

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/healthz":
            if os.path.exists(RoleEnvironment.get_setting("probe") + ".garbage"):
                self.wfile.write(b"x" * 70000)  # no line end: past a reader's 64 KiB limit
                self.close_connection = True
                return
            healthy = not os.path.exists(RoleEnvironment.get_setting("probe") + ".sick")
            return self.reply(200 if healthy else 503, b"ok" if healthy else b"sick")
        if url.path == "/slow":
            time.sleep(float(query["s"]))
        if url.path == "/connections":
            return self.reply(200, str(Handler.connections).encode())
        if url.path == "/cut":  # half a body, then the host dies
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.write(b"x" * 5000)
            self.wfile.flush()
            os._exit(1)
        if url.path == "/recycle":
            RoleEnvironment.request_recycle()
            return self.reply(200, b"recycling")
        if url.path == "/die" and RoleEnvironment.current_instance.index == 0:
            os._exit(1)  # the host dies with the request read and no byte answered
        if url.path == "/ws":  # an upgraded connection that echoes in upper case
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while data := self.connection.recv(65536):
                self.connection.sendall(data.upper())
            self.close_connection = True
            return
        if url.path in ("/ws-reset", "/ws-end"):
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            if url.path == "/ws-reset":  # the instance cuts the tunnel with a reset
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
                return
            try:  # how the client's side of the tunnel ended, as the instance saw it
                while self.connection.recv(65536):
                    pass
                Handler.tunnel_end = "end"
            except ConnectionResetError:
                Handler.tunnel_end = "reset"
            return
        if url.path == "/tunnel-end":
            return self.reply(200, Handler.tunnel_end.encode())
        if url.path == "/big":  # a chunked response of n bytes
            n, block = int(query["n"]), b"x" * 65536
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while n > 0:
                part = block[:min(n, len(block))]
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(part), part))
                n -= len(part)
            self.wfile.write(b"0\\r\\n\\r\\n")
            return
        if url.path == "/headers":  # the request's head as the instance got it
            lines = "".join(f"{k}: {v}\\n" for k, v in self.headers.items())
            return self.reply(200, f"Target: {self.path}\\n{lines}".encode())
        if url.path == "/endless-head":  # a header field that goes on, then a close
            self.wfile.write(b"HTTP/1.1 200 OK\\r\\nX-Long: ")
            for _ in range(64):
                self.wfile.write(b"a" * 16384)
            self.close_connection = True
            return
        if url.path == "/reason":
            self.send_response(200, query["r"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path == "/trailer":  # a chunked body with a trailer field, in another coding
            self.send_response(200)
            self.send_header("Transfer-Encoding", query.get("te", "chunked"))
            self.send_header("Connection", "X-Internal")
            self.send_header("X-Internal", "secret")  # named by Connection: hop-by-hop
            self.end_headers()
            self.wfile.write(b"2\\r\\nhi\\r\\n0\\r\\nX-Sum: abc\\r\\n\\r\\n")
            return
        if url.path == "/two-lengths":  # a malformed response
            self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n"
                             b"Content-Length: 3\\r\\n\\r\\nab")
            return
        self.reply(200, RoleEnvironment.current_instance.id.encode())

    def do_HEAD(self):  # what a GET of 1234 bytes would send, without them
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.end_headers()

    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.path == "/late":  # a body read only after a while
            time.sleep(2.5)
        if self.headers.get("Transfer-Encoding", "").endswith("chunked"):
            while (length := int(self.rfile.readline().strip(), 16)):
                data = self.rfile.read(length)
                digest.update(data); size += len(data)
                self.rfile.readline()
            self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            digest.update(data); size += len(data)
        if self.path == "/headers":
            lines = "".join(f"{k}: {v}\\n" for k, v in self.headers.items())
            return self.reply(200, lines.encode())
        forwarded = self.headers.get("X-Forwarded-For", "")
        self.reply(200, f"{size} {digest.hexdigest()} {forwarded}".encode())

class Role(RoleEntryPoint):
    def on_start(self):
        me = RoleEnvironment.current_instance
        self.server = serve(Handler)
        delay = RoleEnvironment.get_setting("warmup").split(",")[me.index]
        time.sleep(float(delay))
        RoleEnvironment.on_status_check(self.check)
        return True

    def check(self, status):
        if os.path.exists(RoleEnvironment.get_setting("probe") + ".busy"):
            status.busy()

    def on_stop(self):
        self.server.shutdown()
"""
