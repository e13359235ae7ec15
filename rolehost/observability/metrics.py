"""Prometheus metrics of the controller: `GET /v1/metrics` on the control socket, and on
`[service] metrics = "host:port"` when set (off by default).

Counters and histograms are updated where things happen; the state of instances and
balancers is read at scrape time by `StateCollector`, so nothing is kept twice. The
balancer's own figures are among that state: it counts every request it relays
(`Backend.served`, `balancer.Tally`), and a prometheus_client child costs a lock and
several calls per update (a tenth of the relay's Python time), where a plain count costs
an addition (everything runs on the loop).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from rolehost.fabric.lifecycle import State

if TYPE_CHECKING:
    from rolehost.fabric.controller import Controller

# The exposition is the 0.0.4 text format, where a counter's or histogram's creation
# time is one more gauge per series (`*_created`): Prometheus stores each as a plain
# gauge, doubling the series for nothing PromQL needs (rate() sees counter resets on its
# own). Process-wide, but only the controller's side of rolehost imports this module.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

STARTS = Counter("rolehost_instance_starts", "Boots and host restarts of instances, by cause",
                 ["role", "cause"], registry=REGISTRY)
TIME_TO_READY = Histogram("rolehost_time_to_ready_seconds",
                          "From the start of a boot (tasks included) to ready", ["role"],
                          buckets=SECONDS, registry=REGISTRY)
DEADLINE_MISSES = Counter("rolehost_ready_deadline_misses", "Instances that missed the "
                          "ready deadline", ["role"], registry=REGISTRY)
TASK_SECONDS = Histogram("rolehost_task_duration_seconds", "Startup tasks' run time",
                         ["role", "type"], buckets=SECONDS, registry=REGISTRY)
TASK_FAILURES = Counter("rolehost_task_failures", "Startup tasks that failed",
                        ["role", "type"], registry=REGISTRY)
ERRORS = Counter("rolehost_balancer_errors", "Retries, 502s, 503s and cut responses",
                 ["endpoint", "kind"], registry=REGISTRY)
LIMITS = Counter("rolehost_limits_reached", "Times an endpoint stopped accepting: at its "
                 "max_connections (limit=connections), or out of descriptors "
                 "(limit=descriptors)", ["endpoint", "limit"], registry=REGISTRY)
MEMORY_RECYCLES = Counter("rolehost_memory_recycles", "Instances recycled over their "
                          "role's max_memory", ["role"], registry=REGISTRY)
DISCOVERY_MESSAGES = Counter("rolehost_discovery_messages", "`peers` messages written to "
                              "hosts: one per host a batch of changed records goes to",
                              registry=REGISTRY)
DISCOVERY_RECORDS = Counter("rolehost_discovery_records", "Instance records written to "
                            "hosts in `peers` messages, each counted once per host",
                            registry=REGISTRY)
DISCOVERY_ENCODED = Counter("rolehost_discovery_encoded", "Instance records serialised "
                            "to JSON, for the tables hosts start with and for `peers` "
                            "messages alike", registry=REGISTRY)
OPERATIONS = Counter("rolehost_operations", "Management operations ended, by kind and "
                     "outcome", ["kind", "outcome"], registry=REGISTRY)


class StateCollector(Collector):
    """Instances by role and state, rotation and load of each backend, at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Any]:

        instances = GaugeMetricFamily("rolehost_instances", "Instances by role and state",
                                      labels=["role", "state"])
        # Every state of every role, 0 included: a series that vanished when its last
        # instance left the state would keep showing its last value on a dashboard
        # until it went stale, and `sum by (state)` would miss it.
        roles = {*self.controller.definition.roles,
                 *(i.role_name for i in self.controller.instances.values())}
        counts = {(role, state.value): 0 for role in roles for state in State}
        for instance in self.controller.instances.values():
            counts[instance.role_name, instance.state.value] += 1
        for (role, state), count in sorted(counts.items()):
            instances.add_metric([role, state], count)
        yield instances
        back = GaugeMetricFamily("rolehost_instances_back", "Instances back: ready and in "
                                 "rotation on every input endpoint", labels=["role"])
        for role in sorted(roles):
            back.add_metric([role], sum(i.back for i in self.controller.instances.values()
                                        if i.role_name == role))
        yield back
        rotation = GaugeMetricFamily("rolehost_in_rotation", "1 while the instance takes "
                                     "traffic on the endpoint", labels=["endpoint", "instance"])
        active = GaugeMetricFamily("rolehost_active", "Requests or connections in flight",
                                   labels=["endpoint", "instance"])
        served = CounterMetricFamily("rolehost_balancer_requests", "Requests (http) or "
                                     "connections (tcp) served, by endpoint and instance",
                                     labels=["endpoint", "instance"])
        latency = HistogramMetricFamily("rolehost_balancer_request_seconds",
                                        "Time to relay a request", labels=["endpoint"])
        connections = GaugeMetricFamily("rolehost_balancer_connections", "Client "
                                        "connections open", labels=["endpoint"])
        most = GaugeMetricFamily("rolehost_balancer_max_connections", "Client connections "
                                 "open at most: beyond, new ones wait in the listen backlog",
                                 labels=["endpoint"])
        # The staging slot's listeners are labelled ROLE.ENDPOINT@staging (Balancer.label).
        for balancer in self.controller.balancers + self.controller.slots.listeners():
            connections.add_metric([balancer.label], float(len(balancer.connections)))
            most.add_metric([balancer.label], float(balancer.max_connections))
            for backend in balancer.backends.values():
                labels = [balancer.label, backend.instance_id]
                rotation.add_metric(labels, float(backend.in_rotation))
                active.add_metric(labels, float(backend.active))
                served.add_metric(labels, float(backend.served))
            latency.add_metric([balancer.label], balancer.latency.buckets(),
                               balancer.latency.sum)
        yield from (rotation, active, served, latency, connections, most)
        memory = GaugeMetricFamily("rolehost_instance_memory_bytes", "Resident memory of "
                                   "the instance's host and its descendants, added up, as "
                                   "last measured", labels=["role", "instance"])
        for instance in self.controller.instances.values():
            if instance.memory is not None:
                memory.add_metric([instance.role_name, instance.id], float(instance.memory))
        yield memory
        slots = GaugeMetricFamily("rolehost_slot_instances", "Instances of the deployment in "
                                  "each slot, with its version and deployment id",
                                  labels=["slot", "version", "deployment"])
        for slot, deployed in self.controller.slots.summary().items():
            slots.add_metric([slot, deployed["version"], deployed["deployment_id"]],
                             deployed["instances"])
        yield slots
        yield from descriptors()


def descriptors() -> Iterator[Any]:
    """The controller's open descriptors and its (soft) limit."""
    import resource

    with contextlib.suppress(OSError):
        yield GaugeMetricFamily("rolehost_open_descriptors", "Descriptors the controller "
                                "has open", value=float(len(os.listdir("/proc/self/fd"))))
    yield GaugeMetricFamily("rolehost_descriptor_limit", "The controller's descriptor limit "
                            "(soft RLIMIT_NOFILE, raised to the hard one at start)",
                            value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))


def exposition() -> bytes:
    return bytes(generate_latest(REGISTRY))
