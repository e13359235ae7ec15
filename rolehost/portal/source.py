"""What the portal knows of the service: the control API's answers, through the same
client as the CLI, and two bounded records the portal keeps while a page is open.

- The controller's events, fetched after the last one seen (`GET /v1/events?since=N`):
  the instances' state changes and the walks' domains, with their times, are what the
  timeline draws. The controller keeps its last 10,000; an older operation's come from
  its event log, `logs/controller.log` in the run directory.
- Samples of the metrics (`GET /v1/metrics`), taken at most once a second while a page
  asks for the service: requests and failed requests per endpoint, and their latency,
  as counters to tell rates from. Nothing is sampled while no page is open.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from rolehost.client import ApiError, Client
from rolehost.fabric.rundir import RunDir

EVENTS_KEPT = 20_000
SAMPLES_KEPT = 3600  # an hour at one a second
SAMPLE_EVERY = 1.0
# A page refreshes its parts each second, each asking for the status: they share one.
STATUS_FRESH = 0.5
FAILED_KINDS = ("502", "503", "cut")  # a retry is not a failed request: the client got one


@dataclass
class Sample:
    """The balancer's counters at `time`, by endpoint: requests, failed requests, and the
    sum and count of their relay latencies."""

    time: float
    requests: dict[str, float] = field(default_factory=dict)
    failed: dict[str, float] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, float] = field(default_factory=dict)


def parse_sample(text: str, now: float) -> Sample:
    sample = Sample(now)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            endpoint = s.labels.get("endpoint", "")
            if s.name == "rolehost_balancer_requests_total":
                sample.requests[endpoint] = sample.requests.get(endpoint, 0.0) + s.value
            elif s.name == "rolehost_balancer_errors_total" and s.labels.get("kind") in (
                    FAILED_KINDS):
                sample.failed[endpoint] = sample.failed.get(endpoint, 0.0) + s.value
            elif s.name == "rolehost_balancer_request_seconds_sum":
                sample.latency_sum[endpoint] = s.value
            elif s.name == "rolehost_balancer_request_seconds_count":
                sample.latency_count[endpoint] = s.value
    return sample


def seconds(stamp: str | None) -> float | None:
    """An ISO 8601 time of the API or the event log, as a Unix time."""
    from datetime import datetime

    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _until(events: list[dict[str, Any]], ended: float) -> list[dict[str, Any]]:
    return [e for e in events if (t := seconds(e.get("timestamp"))) is not None and t <= ended]


class Source:
    """The control API's answers for the portal's pages; safe to call from the server's
    worker threads."""

    def __init__(self, run_dir: RunDir, timeout: float = 10.0) -> None:
        self.run_dir = run_dir
        self.client = Client(run_dir.socket, timeout=timeout)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self._controller: tuple[Any, Any] | None = None  # its pid and start: a new one numbers
        self._lock = threading.Lock()                     # its events from 1 again
        self._status: tuple[float, dict[str, Any]] | None = None  # when asked, the answer
        # Staging's, and the production status it was asked with: asked again with each
        # new one, so that the two slots a page shows are never a swap apart for long.
        self._staging: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._read: tuple[Any, list[dict[str, Any]]] | None = None  # the event log, as read

    def status(self) -> dict[str, Any]:
        """The controller's status; the events and a metrics sample are brought up to date
        with it, so that a page that shows the service keeps the timeline's record."""
        with self._lock:
            last = self._status
        if last is not None and time.monotonic() - last[0] < STATUS_FRESH:
            return last[1]
        status = self.client.status()
        with self._lock:
            self._status = (time.monotonic(), status)
            controller = (status["pid"], status["started"])
            if controller != self._controller:
                self._controller = controller
                self.events.clear()
            self._fetch_events()
            now = time.time()
            if not self.samples or now - self.samples[-1].time >= SAMPLE_EVERY:
                self.samples.append(parse_sample(self.client.request_raw(
                    "GET", "/v1/metrics"), now))
        return status

    def staging(self, production: dict[str, Any]) -> dict[str, Any] | None:
        """The staging slot's status when `production`'s status names a staging
        deployment, else None (the common case: no second request)."""
        if "staging" not in (production.get("slots") or {}):
            return None
        with self._lock:
            last = self._staging
        if last is not None and last[0] is production:
            return last[1]
        try:
            status: dict[str, Any] | None = self.client.status("staging")
        except ApiError as exc:
            if exc.status != 404:
                raise
            status = None  # deleted since production's status was taken
        with self._lock:
            self._staging = (production, status)
        return status

    def forget(self) -> None:
        """An action changed the service: the next page asks the controller again."""
        with self._lock:
            self._status = self._staging = None

    def _fetch_events(self) -> None:
        since = self.events[-1]["seq"] if self.events else 0
        self.events.extend(self.client.events(since))

    def events_after(self, since: int, instance: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            self._fetch_events()
            return [e for e in self.events if e["seq"] > since
                    and (instance is None or e.get("instance") == instance)]

    def events_between(self, began: float, ended: float) -> list[dict[str, Any]]:
        """The events from `began` to `ended`, and the last state of each instance before
        (what it was in when the window opens): from memory when it reaches that far
        back, else from the event log."""
        with self._lock:
            kept = list(self.events)
        oldest = seconds(kept[0].get("timestamp")) if kept else None
        return _until(kept if oldest is not None and oldest <= began else self._logged(), ended)

    def _logged(self) -> list[dict[str, Any]]:
        """The events of the event log and its last rotation, oldest first. A page asks
        again every second: the files are read again only once they changed."""
        path: Path = self.run_dir.logs / "controller.log"
        files = [f for f in (path.with_name(path.name + ".1"), path) if f.exists()]
        key = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if self._read is not None and self._read[0] == key:
            return self._read[1]
        events = []
        for older in files:
            for line in older.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    events.append(event)
        self._read = (key, events[-EVENTS_KEPT * 5:])
        return self._read[1]

    def samples_between(self, began: float, ended: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if began <= s.time <= ended]
