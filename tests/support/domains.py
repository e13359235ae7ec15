"""Update domains as a test reads them from a service's events."""

from __future__ import annotations

from typing import Any

from rolehost.testing import ServiceHarness


def down_windows(events: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """For each instance, the (first seq, last seq) spans in which it was not ready."""
    windows: dict[str, list[tuple[int, int]]] = {}
    left: dict[str, int] = {}
    for event in events:
        if event["event"] != "state":
            continue
        name = event["instance"]
        if event["previous"] == "ready" and name not in left:
            left[name] = event["seq"]
        elif event["state"] == "ready" and name in left:
            windows.setdefault(name, []).append((left.pop(name), event["seq"]))
    return windows


def assert_one_domain_down_at_a_time(h: ServiceHarness, domains: int) -> None:
    """No instance was out of ready while one of another update domain was (instance i
    is in domain i % domains)."""
    windows = down_windows(h.events())
    spans = [(start, end, int(name.rsplit("_", 1)[1]) % domains)
             for name, spans in windows.items() for start, end in spans]
    for a in spans:
        for b in spans:
            if a[2] != b[2]:
                assert a[1] < b[0] or b[1] < a[0], f"UD {a[2]} and UD {b[2]} down together"
