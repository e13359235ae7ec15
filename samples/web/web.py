"""A web role: warms a cache in on_start, and /healthz answers 200 only once warm."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rolehost import RoleEntryPoint, RoleEnvironment


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server would
    # The head and the body are two writes: without TCP_NODELAY, Nagle's algorithm and
    # the peer's delayed ACK hold the body back about 40 ms.
    disable_nagle_algorithm = True
    server: "Server"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            warm = self.server.warm.is_set()
            self.reply(200 if warm else 503, {"warm": warm})
        else:
            self.reply(200, {"instance": RoleEnvironment.current_instance.id, "path": self.path,
                             "greeting": self.server.greeting})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.reply(200, {"instance": RoleEnvironment.current_instance.id, "received": len(body)})

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the instance log


class Server(ThreadingHTTPServer):
    daemon_threads = True
    warm = threading.Event()
    greeting = ""


class WebRole(RoleEntryPoint):
    def on_start(self) -> bool:
        endpoint = RoleEnvironment.current_instance.endpoints["http"]
        self.server = Server((endpoint.host, endpoint.port), Handler)
        self.server.greeting = RoleEnvironment.get_setting("greeting")
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        time.sleep(float(RoleEnvironment.get_setting("warmup_seconds")))  # fill the cache
        self.server.warm.set()
        return True

    def on_stop(self) -> None:
        self.server.shutdown()
