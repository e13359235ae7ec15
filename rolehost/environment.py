"""`RoleEnvironment`: what an instance knows about itself, and the events it can handle.

Inside a host process `RoleEnvironment` is bound to the instance the process runs;
elsewhere `RoleEnvironment.is_available` is False and everything else raises
`RoleEnvironmentError`. Handlers may be plain functions or coroutine functions.

This module is imported by every host process before the role's first line runs, so
it imports nothing that a role does not need at run time: no typing, no dataclasses
(they bring inspect), and pathlib only when a path is asked for.
"""

from __future__ import annotations

import threading
from enum import StrEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from pathlib import Path
    from typing import Any, Protocol, TypeVar

    Handler = TypeVar("Handler", bound=Callable[..., Any])

    class _Runtime(Protocol):
        """What the environment asks of the process it lives in (the host)."""

        def request_recycle(self, reason: str) -> None: ...


def _path(text: str) -> Path:
    from pathlib import Path

    return Path(text)


class _Record:
    """A small immutable value: fields named by __slots__, compared and shown by value."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class RoleEnvironmentError(RuntimeError):
    """Asked for something the environment does not have."""


class SettingNotFound(RoleEnvironmentError, KeyError):
    """`get_setting` of a name the role does not declare."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class RoleStatus(StrEnum):
    READY = "ready"
    BUSY = "busy"


class InstanceEndpoint(_Record):
    """Where an instance listens for one endpoint: the current instance binds it, the
    others connect to it. `protocol` is what the instance speaks there (an https input
    endpoint's instances speak http: the balancer terminates TLS)."""

    __slots__ = ("host", "name", "port", "protocol")
    name: str
    host: str
    port: int
    protocol: str

    def __init__(self, name: str, host: str, port: int, protocol: str) -> None:
        super().__init__(name=name, host=host, port=port, protocol=protocol)


class RoleInstance(_Record):
    """An instance of the service: `id` like `web_IN_0`, its role, index and UD, where
    each of its endpoints (input, internal and instance) listens, and whether it is
    ready (and in rotation on its input endpoints) as of the controller's last word."""

    __slots__ = ("endpoints", "id", "index", "ready", "role", "update_domain")
    id: str
    role: str
    index: int
    update_domain: int
    endpoints: Mapping[str, InstanceEndpoint]
    ready: bool

    def __init__(self, id: str, role: str, index: int, update_domain: int,
                 endpoints: Mapping[str, InstanceEndpoint], ready: bool = False) -> None:
        super().__init__(id=id, role=role, index=index, update_domain=update_domain,
                         endpoints=endpoints, ready=ready)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoleInstance:
        """From the controller's record of an instance (see rolehost.protocol `peers`)."""
        return cls(id=record["id"], role=record["role"], index=record["index"],
                   update_domain=record["update_domain"], ready=bool(record.get("ready")),
                   endpoints={n: InstanceEndpoint(name=n, **e)
                              for n, e in record.get("endpoints", {}).items()})


class Role(_Record):
    """A role of the service and its instances, in index order. Iterating it, or taking
    its len(), gives its instance ids, as `RoleEnvironment.roles[NAME]` did when it was
    a list of ids."""

    __slots__ = ("instances", "name")
    name: str
    instances: tuple[RoleInstance, ...]

    def __init__(self, name: str, instances: Iterable[RoleInstance]) -> None:
        super().__init__(name=name, instances=tuple(instances))

    def __iter__(self) -> Iterator[str]:
        return (instance.id for instance in self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def __contains__(self, instance_id: object) -> bool:
        return any(instance.id == instance_id for instance in self.instances)


class LocalResource(_Record):
    """A declared local storage folder, `resources/NAME/`."""

    __slots__ = ("name", "path", "size_mb")
    name: str
    path: Path
    size_mb: int

    def __init__(self, name: str, path: Path, size_mb: int) -> None:
        super().__init__(name=name, path=path, size_mb=size_mb)


class Context:
    """Everything a host needs to know about its instance, sent in its `assign` message."""

    def __init__(
        self,
        instance_id: str,
        role: str,
        index: int,
        update_domain: int,
        deployment_id: str,
        entry_point: str,
        app_dir: str,
        os_dir: str,
        stop_timeout: float,
        status_check_interval: float,
        settings: dict[str, Any] | None = None,
        endpoints: dict[str, dict[str, Any]] | None = None,
        resources: dict[str, dict[str, Any]] | None = None,
        topology: dict[str, list[str]] | None = None,
        site: dict[str, Any] | None = None,
        peers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.instance_id, self.role, self.index = instance_id, role, index
        self.update_domain, self.deployment_id = update_domain, deployment_id
        self.entry_point, self.app_dir, self.os_dir = entry_point, app_dir, os_dir
        self.stop_timeout, self.status_check_interval = stop_timeout, status_check_interval
        self.settings: dict[str, Any] = settings or {}
        self.endpoints: dict[str, dict[str, Any]] = endpoints or {}
        self.resources: dict[str, dict[str, Any]] = resources or {}
        # The instance ids of each role, as of the last topology change (`changed`), and
        # the controller's record of each instance, kept current as they come and go
        # ready and move ports (`peers`): RoleEnvironment.roles joins the two.
        self.topology: dict[str, list[str]] = topology or {}
        self.site = site  # a web role's site (Role.site_context), served by rolehost.site
        self.peers: dict[str, dict[str, Any]] = peers or {}



class StatusCheck:
    """Passed to status-check handlers: call `busy()` to leave rotation until the next check."""

    def __init__(self) -> None:
        self.status = RoleStatus.READY

    def busy(self) -> None:
        self.status = RoleStatus.BUSY


class SettingChange(_Record):
    """One setting that changed: its name, the old and the new value (None if absent)."""

    __slots__ = ("name", "new", "old")
    name: str
    old: Any
    new: Any

    def __init__(self, name: str, old: Any, new: Any) -> None:
        super().__init__(name=name, old=old, new=new)


class TopologyChange(_Record):
    """The instances of `role` changed: a scale out or in, or one of them came back
    listening on other ports."""

    __slots__ = ("role",)
    role: str

    def __init__(self, role: str) -> None:
        super().__init__(role=role)


class Changing:
    """Passed to `changing` handlers: call `cancel()` to recycle the instance to apply."""

    def __init__(self, changes: list[SettingChange | TopologyChange]) -> None:
        self.changes = changes
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


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

    @property
    def context(self) -> Context:
        if self._context is None:
            raise RoleEnvironmentError(
                "RoleEnvironment is only available inside a rolehost instance "
                "(a host process started by `rolehost start`)"
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
            ready=bool(ctx.peers.get(ctx.instance_id, {}).get("ready")),
        )

    @property
    def roles(self) -> Mapping[str, Role]:
        """Every role of the service, by name, with its instances as of the last topology
        change: where each listens and whether it is ready, kept current as instances
        recycle, move or come back. An instance that is not ready stays listed."""
        ctx = self.context
        peers = ctx.peers
        return {
            role: Role(role, (
                RoleInstance.from_record(peers[i]) if i in peers else RoleInstance(
                    id=i, role=role, index=int(i.rpartition("_")[2]), update_domain=0,
                    endpoints={})
                for i in ids))
            for role, ids in ctx.topology.items()
        }

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
        return LocalResource(name=name, path=_path(spec["path"]), size_mb=spec["size_mb"])

    @property
    def os_dir(self) -> Path:
        return _path(self.context.os_dir)

    @property
    def app_dir(self) -> Path:
        return _path(self.context.app_dir)

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

    def apply_peers(self, records: list[dict[str, Any]]) -> list[TopologyChange]:
        """Take the controller's new records of instances; a `TopologyChange` for each
        role listed here one of whose instances moved (its endpoints changed)."""
        ctx = self.context
        moved: set[str] = set()
        for record in records:
            old = ctx.peers.get(record["id"])
            ctx.peers[record["id"]] = record
            if (old is not None and old.get("endpoints") != record.get("endpoints")
                    and record["id"] in ctx.topology.get(record["role"], ())):
                moved.add(record["role"])
        return [TopologyChange(role) for role in sorted(moved)]

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
