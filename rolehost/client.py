"""A client of the control API, for the CLI and rolehost.testing."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote


class ControllerNotRunning(ConnectionError):
    """Nothing answers on the run directory's control socket."""


class ControllerLost(ControllerNotRunning):
    """The controller took the request and closed the connection (it exited, or was
    killed) or went silent past the timeout before it answered."""


class ApiError(RuntimeError):
    """The API's answer was an error: its `status`, its `message`, and its `kind` (see
    docs/api.md: `preflight` is a deploy refused before any instance was touched, whatever
    the status). `kind` is None from a controller older than kinds, and for the metrics."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _connect(self, conn: _UnixConnection) -> None:
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControllerNotRunning(
                f"no controller is running (nothing answers on {self.socket_path})"
            ) from exc

    @staticmethod
    @contextlib.contextmanager
    def _answered(timeout: float) -> Iterator[None]:
        """A controller that dies while a request waits (a scale, a `--wait`) ends the
        request with ControllerLost, not with what http.client makes of the closed socket."""
        try:
            yield
        except TimeoutError as exc:
            raise ControllerLost(f"the controller did not answer within {timeout:g}s") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise ControllerLost(
                "the controller closed the connection before it answered: it has exited "
                "or was killed (`rolehost logs` tells why)") from exc

    def request_raw(self, method: str, path: str) -> str:
        """A response that is not JSON (the metrics), as text."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            self._connect(conn)
            with self._answered(self.timeout):
                conn.request(method, path)
                response = conn.getresponse()
                text = response.read().decode()
        finally:
            conn.close()
        if response.status >= 400:
            raise ApiError(response.status, text)
        return text

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        try:
            self._connect(conn)
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            with self._answered(timeout or self.timeout):
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = json.loads(response.read() or b"null")
        finally:
            conn.close()
        if response.status >= 400:
            error = payload if isinstance(payload, dict) else {}
            raise ApiError(response.status, error.get("error") or f"HTTP {response.status}",
                           error.get("kind"))
        return payload

    def status(self, slot: str | None = None) -> dict[str, Any]:
        """The service's status: production's, or with `slot`, that slot's."""
        query = "" if slot is None else f"?slot={quote(slot, safe='')}"
        result: dict[str, Any] = self.request("GET", f"/v1/status{query}")
        return result

    def instance(self, name: str, slot: str = "production") -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", f"/v1/instances/{quote(name, safe='')}?slot={quote(slot, safe='')}")
        return result

    def check_status(self, name: str) -> None:
        """Have an instance run its status checks now, not at its next interval."""
        self.request("POST", f"/v1/instances/{quote(name, safe='')}/status-check")

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", f"/v1/events?since={since}")
        return result

    def maintain(
        self, kind: str, instances: list[str], wait: bool = False, timeout: float | None = None,
        slot: str = "production",
    ) -> list[dict[str, Any]]:
        """`restart`, `reimage`, `rebuild`, `recycle` or `agent-update` the instances (of
        the deployment in `slot`)."""
        result: list[dict[str, Any]] = self.request(
            "POST", f"/v1/operations/{kind}",
            {"instances": instances, "wait": wait, "slot": slot}, timeout=timeout,
        )
        return result

    def upgrade(self, kind: str, manual: bool = False, slot: str = "production"
                ) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/upgrades/{kind}",
                                              {"manual": manual, "slot": slot})
        return result

    def package(self, version: str | None = None, source: Path | None = None) -> dict[str, Any]:
        """Package the definition file `source` (default: the running one)."""
        body: dict[str, Any] = {"version": version}
        if source is not None:
            body["source"] = str(source.resolve())
        result: dict[str, Any] = self.request("POST", "/v1/packages", body)
        return result

    def packages(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/packages")
        return result

    def deploy(self, version: str, rollback: bool = True, manual: bool = False,
               slot: str = "production", timeout: float | None = None) -> dict[str, Any]:
        """Production: an in-place walk (its snapshot). Staging: a second deployment,
        answered once its instances are back (the staging slot's status)."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/deploy/{quote(version, safe='')}",
            {"rollback": rollback, "manual": manual, "slot": slot}, timeout=timeout,
        )
        return result

    def delete_slot(self, slot: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("DELETE", f"/v1/slots/{quote(slot, safe='')}")
        return result

    def swap(self) -> dict[str, Any]:
        """Swap the deployments of the production and staging slots; each slot's now."""
        result: dict[str, Any] = self.request("POST", "/v1/swap")
        return result

    def configure(self, role: str, settings: dict[str, Any], slot: str = "production"
                  ) -> dict[str, str]:
        result: dict[str, str] = self.request(
            "POST", f"/v1/roles/{quote(role, safe='')}/settings",
            {"settings": settings, "slot": slot}
        )
        return result

    def scale(self, role: str, count: int, slot: str = "production") -> list[str]:
        result: list[str] = self.request(
            "POST", f"/v1/roles/{quote(role, safe='')}/instances", {"count": count, "slot": slot}
        )
        return result

    def walk(self, action: str | None = None, since: int = 0) -> dict[str, Any]:
        """The current walk, its `steps` after the `since`-th only; with `action` ("next",
        "abort"), act on it first (and get every step)."""
        if action is None:
            result: dict[str, Any] = self.request("GET", f"/v1/walk?since={since}")
        else:
            result = self.request("POST", f"/v1/walk/{action}")
        return result

    def operations(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/operations")
        return result

    def shutdown(self, timeout: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/shutdown", timeout=timeout)
        return result
