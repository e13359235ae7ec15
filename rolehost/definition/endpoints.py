"""Where a role listens, in `rolehost.toml`: input endpoints behind the balancer (http,
https or tcp) with their probes, internal endpoints (no balancer, found through
discovery), and instance input endpoints (each instance on a public port of its own).

A module of its own beside the model (which imports it and says where each goes in a
role): the endpoints are one concept.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, field_validator, model_validator

from rolehost.definition.errors import DefinitionError
from rolehost.definition.scalars import (
    MAX_INSTANCES,
    PORT_RANGE_PATTERN,
    parse_port_range,
)
from rolehost.definition.schema import NO_NUL, SchemaOnly
from rolehost.definition.types import Boolean, Duration, Integer, Text
from rolehost.definition.types import Model as _Model

PemPath = Annotated[Path, SchemaOnly(pattern=NO_NUL)]


class Protocol(StrEnum):
    http = "http"
    https = "https"
    tcp = "tcp"


class PeerProtocol(StrEnum):
    """What an internal or instance endpoint speaks: rolehost relays neither, so it is
    what discovery reports, and what the Kubernetes export names."""

    tcp = "tcp"
    http = "http"


class Probe(_Model):
    """A health probe of each instance's endpoint: an HTTP GET of `path` (2xx/3xx passes),
    or, without `path`, a TCP connect. An instance enters rotation after `healthy` passes
    in a row and leaves it after `unhealthy` failures in a row."""

    path: Text | None = Field(default=None, pattern=r"^/", description="HTTP path; none: TCP")
    interval: Duration = Field(default=2.0, gt=0, description="time between probes")
    timeout: Duration = Field(default=1.0, gt=0, description="a probe slower than this fails")
    healthy: Integer = Field(default=1, ge=1, description="passes in a row to enter rotation")
    unhealthy: Integer = Field(default=2, ge=1, description="failures in a row to leave it")


class Balance(StrEnum):
    round_robin = "round-robin"
    least_outstanding = "least-outstanding"


class BalancerKind(StrEnum):
    builtin = "builtin"
    external = "external"


class Endpoint(_Model):
    """An input endpoint: the built-in balancer listens on `host:port` and spreads the
    traffic over the instances in rotation. Each instance gets a private port for it,
    which the role reads from `RoleEnvironment.current_instance.endpoints` and binds."""

    # An https endpoint names its certificate and key, and only it does: the schema says
    # so too. That the files exist and match is checked where the definition is read.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"protocol": {"const": "https"}}, "required": ["protocol"]},
        "then": {"required": ["certificate", "key"]},
        "else": {"properties": {"certificate": False, "key": False}},
    })

    port: Integer = Field(ge=1, le=65535, description="public port the balancer listens on; "
                          "each endpoint and the metrics have their own, whatever the host")
    staging_port: Integer | None = Field(default=None, ge=1, le=65535, description="public "
        "port in the staging slot (docs/deploying.md), required for a staging deploy")
    protocol: Protocol = Field(default=Protocol.http, description="http, https or tcp; "
                               "https: the balancer terminates TLS (1.2 and later) and "
                               "relays HTTP/1.1 to the instances with `X-Forwarded-Proto: "
                               "https`")
    host: Text = Field(default="127.0.0.1", description="address the balancer binds")
    certificate: PemPath | None = Field(
        default=None, description="https: the certificate chain (PEM), relative to the "
        "definition; read again at every config change, so a renewed file is taken "
        "without a restart")
    key: PemPath | None = Field(
        default=None, description="https: the certificate's private key (PEM), relative "
        "to the definition")
    probe: Probe | None = Field(default=None, description="health probe; none: state only")
    ignore_status: Boolean = Field(
        default=False, description="keep instances in rotation while a status check says busy"
    )
    balance: Balance = Field(default=Balance.round_robin, description="how requests are spread")
    drain_timeout: Duration = Field(
        default=30.0, description="how long a stopping instance may finish in-flight requests"
    )
    queue_timeout: Duration = Field(
        default=10.0, description="how long a request (tcp: a connection) waits for an "
        "instance in rotation, in all: a retry after an instance failed waits only what is left"
    )
    slow_start: Duration = Field(
        default=0.0, description="a joining instance's share of new requests grows over this"
    )
    idle_timeout: Duration = Field(
        default=60.0, description="http: a client connection idle this long while the "
        "balancer waits on it (to send, between requests or within one; or to read its "
        "answer) is closed, and so is a kept-alive connection to an instance that "
        "carries nothing this long; 0: never"
    )
    max_connections: Integer | None = Field(default=None, ge=1, description="client "
        "connections open at once; beyond, new ones wait in the listen backlog until one closes. "
        "Unset: this endpoint's share of the controller's descriptor limit, after a reserve "
        "for its own work (docs/balancer.md, Limits)")
    balancer: BalancerKind = Field(
        default=BalancerKind.builtin, description="builtin: rolehost listens on `port` and "
        "balances; external: your balancer (HAProxy, nginx, a cloud one) owns `port`, and "
        "rolehost serves each instance's readiness on `readiness_port` (docs/external-"
        "balancer.md; `rolehost export haproxy`)")
    instance_port: Integer | None = Field(
        default=None, ge=1, le=65535, description="external: instance N listens on "
        "instance_port + N, so that the balancer's configuration can name it; none: port + 1")
    readiness_port: Integer | None = Field(
        default=None, ge=1, le=65535, description="external: instance N's readiness (HTTP "
        "200/503 and HAProxy's agent-check) is served on readiness_port + N; none: "
        f"port + 1 + {MAX_INSTANCES}")
    readiness_host: Text = Field(default="127.0.0.1",
                                 description="external: address the readiness ports bind")

    @property
    def external(self) -> bool:
        return self.balancer is BalancerKind.external

    def port_ranges(self) -> dict[str, range]:
        """The ports the endpoint takes, by key: `port`, and for an external one a
        range of MAX_INSTANCES (one per instance index) for its instances and one for
        their readiness; `staging_port`, if set."""
        ranges = {"port": range(self.port, self.port + 1)}
        if self.staging_port is not None:
            ranges["staging_port"] = range(self.staging_port, self.staging_port + 1)
        if self.external:
            first = self.instance_port or self.port + 1
            ready = self.readiness_port or self.port + 1 + MAX_INSTANCES
            ranges["instance_port"] = range(first, first + MAX_INSTANCES)
            ranges["readiness_port"] = range(ready, ready + MAX_INSTANCES)
        return ranges

    def private_port(self, index: int) -> int:
        """External: the port instance `index` listens on."""
        return self.port_ranges()["instance_port"][index]

    def readiness_port_of(self, index: int) -> int:
        """External: the port instance `index`'s readiness is served on."""
        return self.port_ranges()["readiness_port"][index]

    @model_validator(mode="after")
    def _certificate_with_https(self) -> Endpoint:
        for key in ("certificate", "key"):
            given = getattr(self, key) is not None
            if self.protocol is Protocol.https and not given:
                raise DefinitionError(None, key, f"expected a {key} file: protocol is https")
            if self.protocol is not Protocol.https and given:
                raise DefinitionError(None, key, f"expected no {key}: only an https "
                                      f"endpoint has one (protocol is {self.protocol.value})")
        return self


class InternalEndpoint(_Model):
    """An internal endpoint: no balancer and no public port. Each instance gets a private
    port for it and binds it; every instance of the service finds it in
    `RoleEnvironment.roles[ROLE].instances[i].endpoints[NAME]`."""

    protocol: PeerProtocol = Field(default=PeerProtocol.tcp, description="tcp or http: "
                                   "what discovery reports; rolehost relays nothing")
    host: Text = Field(default="127.0.0.1", description="address each instance binds")
    port: Integer | None = Field(
        default=None, ge=1, le=65535, description="the port an instance binds where it "
        "has a machine of its own (`rolehost run-instance`, a Kubernetes pod, whose "
        "export needs it); under `rolehost start` each instance gets a private port")


class InstanceEndpoint(_Model):
    """An instance input endpoint (the platform's InstanceInputEndpoint): instance `i`
    binds the `i`-th port of `public_ports` itself, with no balancer, for stateful or
    debug access to one instance."""

    public_ports: Annotated[Text, SchemaOnly(pattern=PORT_RANGE_PATTERN)] = Field(
        description="`\"FIRST-LAST\"` or `\"PORT\"`: instance `i` binds the `i`-th, so at "
        "least one per instance; a `rolehost scale` past the last is refused")
    protocol: PeerProtocol = Field(default=PeerProtocol.tcp, description="tcp or http")
    host: Text = Field(default="127.0.0.1", description="address each instance binds")

    @field_validator("public_ports")
    @classmethod
    def _range(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @property
    def ports(self) -> range:
        return parse_port_range(self.public_ports)
