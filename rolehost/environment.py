"""`RoleEnvironment`: what an instance knows about itself, and the events it can handle.

Inside a host process `RoleEnvironment` is bound to the instance the process runs;
elsewhere `RoleEnvironment.is_available` is False and everything else raises
`RoleEnvironmentError`. Handlers may be plain functions or coroutine functions.

This module is imported by the host process, so it must stay cheap to import.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rolehost.protocol import CONTEXT_ENV

Handler = TypeVar("Handler", bound=Callable[..., Any])


class RoleEnvironmentError(RuntimeError):
    """Asked for something the environment does not have."""


class SettingNotFound(RoleEnvironmentError, KeyError):
    """`get_setting` of a name the role does not declare."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class RoleStatus(StrEnum):
    READY = "ready"
    BUSY = "busy"


@dataclass(frozen=True)
class InstanceEndpoint:
    """Where this instance must listen for one endpoint."""

    name: str
    host: str
    port: int
    protocol: str


@dataclass(frozen=True)
class RoleInstance:
    id: str
    role: str
    index: int
    update_domain: int
    endpoints: Mapping[str, InstanceEndpoint]


@dataclass(frozen=True)
class LocalResource:
    name: str
    path: Path
    size_mb: int


@dataclass
class Context:
    """Everything a host needs to know about its instance; JSON in `ROLEHOST_CONTEXT`."""

    instance_id: str
    role: str
    index: int
    update_domain: int
    deployment_id: str
    entry_point: str
    app_dir: str
    os_dir: str
    stop_timeout: float
    status_check_interval: float
    settings: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))


class StatusCheck:
    """Passed to status-check handlers: call `busy()` to leave rotation until the next check."""

    def __init__(self) -> None:
        self.status = RoleStatus.READY

    def busy(self) -> None:
        self.status = RoleStatus.BUSY


@dataclass(frozen=True)
class SettingChange:
    name: str
    old: Any
    new: Any


class Changing:
    """Passed to `changing` handlers: call `cancel()` to recycle the instance to apply."""

    def __init__(self, changes: list[SettingChange]) -> None:
        self.changes = changes
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Runtime(Protocol):
    """What the environment asks of the process it lives in (the host, or run_role)."""

    def request_recycle(self, reason: str) -> None: ...


class Environment:
    """The type of `RoleEnvironment`; use that singleton rather than this class."""

    def __init__(self) -> None:
        self._context: Context | None = None
        self._runtime: _Runtime | None = None
        self._stopping = threading.Event()
        self.handlers: dict[str, list[Callable[..., Any]]] = {
            "stopping": [],
            "status_check": [],
            "changing": [],
            "changed": [],
        }

    # Binding: done by the host (or rolehost.testing) before user code is imported.

    def bind(self, context: Context, runtime: _Runtime | None) -> None:
        self._context, self._runtime = context, runtime
        self._stopping.clear()
        for handlers in self.handlers.values():
            handlers.clear()

    def unbind(self) -> None:
        self._context = self._runtime = None

    def bind_from_environ(self, runtime: _Runtime | None) -> None:
        self.bind(Context.from_json(os.environ[CONTEXT_ENV]), runtime)

    @property
    def context(self) -> Context:
        if self._context is None:
            raise RoleEnvironmentError(
                "RoleEnvironment is only available inside a rolehost instance "
                "(a host started by `rolehost start`, or rolehost.testing.run_role)"
            )
        return self._context

    # What the instance knows.

    @property
    def is_available(self) -> bool:
        return self._context is not None

    @property
    def current_instance(self) -> RoleInstance:
        ctx = self.context
        return RoleInstance(
            id=ctx.instance_id,
            role=ctx.role,
            index=ctx.index,
            update_domain=ctx.update_domain,
            endpoints={n: InstanceEndpoint(name=n, **e) for n, e in ctx.endpoints.items()},
        )

    @property
    def deployment_id(self) -> str:
        return self.context.deployment_id

    @property
    def settings(self) -> Mapping[str, Any]:
        return dict(self.context.settings)

    def get_setting(self, name: str) -> Any:
        settings = self.context.settings
        if name not in settings:
            known = ", ".join(sorted(settings)) or "none"
            raise SettingNotFound(
                f"role {self.context.role!r} has no setting {name!r} (known settings: {known})"
            )
        return settings[name]

    def local_resource(self, name: str) -> LocalResource:
        resources = self.context.resources
        if name not in resources:
            known = ", ".join(sorted(resources)) or "none"
            raise RoleEnvironmentError(
                f"role {self.context.role!r} has no local resource {name!r} (declared: {known})"
            )
        spec = resources[name]
        return LocalResource(name=name, path=Path(spec["path"]), size_mb=spec["size_mb"])

    @property
    def os_dir(self) -> Path:
        return Path(self.context.os_dir)

    @property
    def app_dir(self) -> Path:
        return Path(self.context.app_dir)

    # Stopping.

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block until a stop begins (True) or `timeout` passes (False)."""
        return self._stopping.wait(timeout)

    def mark_stopping(self) -> None:
        self._stopping.set()

    def request_recycle(self) -> None:
        """Ask for a graceful recycle: `stopping`, on_stop, then a fresh start."""
        if self._runtime is None:
            raise RoleEnvironmentError("request_recycle() needs a running instance")
        self._runtime.request_recycle("request_recycle() called")

    # Events. Each `on_*` returns the handler, so it can be used as a decorator.

    def on_stopping(self, handler: Handler) -> Handler:
        """Called when a graceful stop begins, before on_stop."""
        self.handlers["stopping"].append(handler)
        return handler

    def on_status_check(self, handler: Handler) -> Handler:
        """Called with a `StatusCheck` at every check; call `.busy()` or return BUSY."""
        self.handlers["status_check"].append(handler)
        return handler

    def on_changing(self, handler: Handler) -> Handler:
        """Called with a `Changing` before settings change; `.cancel()` recycles instead."""
        self.handlers["changing"].append(handler)
        return handler

    def on_changed(self, handler: Handler) -> Handler:
        """Called with the list of `SettingChange` after settings changed."""
        self.handlers["changed"].append(handler)
        return handler

    def apply_settings(self, settings: dict[str, Any]) -> list[SettingChange]:
        ctx = self.context
        old = ctx.settings
        changes = [
            SettingChange(k, old.get(k), settings.get(k))
            for k in sorted(old.keys() | settings.keys())
            if old.get(k) != settings.get(k)
        ]
        ctx.settings = dict(settings)
        return changes


RoleEnvironment = Environment()
