"""The shop's web role: the catalog from os/, orders into SQLite, /healthz once warm."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orders

from rolehost import RoleEntryPoint, RoleEnvironment


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are two writes: without TCP_NODELAY, Nagle's algorithm and
    # the peer's delayed ACK hold the body back about 40 ms.
    disable_nagle_algorithm = True
    server: "Shop"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            warm = self.server.warm.is_set()
            self.reply(200 if warm else 503, {"warm": warm})
        elif self.path == "/products":
            self.reply(200, {"instance": self.server.instance, "products": self.server.catalog})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        db = orders.connect(self.server.queue)
        order = orders.place(db, body.get("item", "?"))
        db.close()
        self.reply(201, {"order": order})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Shop(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class WebRole(RoleEntryPoint):
    def on_start(self) -> bool:
        endpoint = RoleEnvironment.current_instance.endpoints["http"]
        self.server = Shop((endpoint.host, endpoint.port), Handler)
        self.server.warm = threading.Event()
        self.server.instance = RoleEnvironment.current_instance.id
        self.server.queue = RoleEnvironment.get_setting("orders_db")
        self.server.catalog = json.loads((RoleEnvironment.os_dir / "catalog.json").read_text())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        cache = RoleEnvironment.local_resource("cache").path
        (cache / "prices.json").write_text(json.dumps({p["sku"]: p["price"]
                                                       for p in self.server.catalog}))
        self.server.warm.set()
        return True

    def on_stop(self) -> None:
        self.server.shutdown()
