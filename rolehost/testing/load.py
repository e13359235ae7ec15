"""`LoadProbe`: steady keep-alive HTTP (or HTTPS) load from threads, counting every
failed request with its cause."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

from rolehost.testing.waiting import wait_until


class LoadProbe:
    """Steady keep-alive HTTP load at a URL from background threads.

        with LoadProbe(service.url("web", "http"), clients=4) as load:
            service.restart("web/0")
        assert load.failures == [], load.failures

    Every response with a status of 400 or more, and every connection error, is a
    failure with its cause; a failed connection is opened again and the load goes on.
    """

    def __init__(self, url: str, clients: int = 4, timeout: float = 30.0,
                 method: str = "GET", body: bytes | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        """An `https://` URL is loaded over TLS, verified with `context` (default: the
        system's trust)."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.context = context
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.clients, self.timeout, self.method, self.body = clients, timeout, method, body
        self.requests = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LoadProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, name=f"load-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.requests >= count, timeout, f"{count} requests")

    def _client(self) -> None:
        import http.client

        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                if connection is None:
                    connection = (http.client.HTTPSConnection(
                        self.host, self.port, timeout=self.timeout, context=self.context)
                        if self.tls else http.client.HTTPConnection(
                            self.host, self.port, timeout=self.timeout))
                connection.request(self.method, self.path, body=self.body)
                response = connection.getresponse()
                response.read()
                failure = None if response.status < 400 else f"HTTP {response.status}"
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                failure = f"{type(exc).__name__}: {exc}"
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                self.requests += 1
                self.latencies.append(time.perf_counter() - began)
                if failure is not None:
                    self.failures.append(failure)
        if connection is not None:
            connection.close()

    def percentile(self, p: float) -> float:
        """The p-th percentile of latencies, in seconds."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0

    def report(self) -> dict[str, Any]:
        return {"requests": self.requests, "failures": len(self.failures),
                "causes": sorted(set(self.failures)),
                "p50_ms": round(self.percentile(50) * 1000, 2),
                "p99_ms": round(self.percentile(99) * 1000, 2)}
