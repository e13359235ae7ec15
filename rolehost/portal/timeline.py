"""The walk timeline: an SVG picture of an operation. Instances are rows, grouped by
update domain; time runs along x; each instance's state is a colour; the walk's steps
(a domain begun, paused, halted) are marked; where the balancer serves, requests per
second and failed requests are drawn under it on the same time axis.

Pure: it is given the events and the samples, and returns the SVG as text.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from rolehost.portal.source import Sample, seconds

COLOURS = {
    "created": "#d0d0d0", "bootstrapping": "#f2c14e", "starting": "#f2a541",
    "busy": "#8fb8de", "ready": "#3c9d4e", "stopping": "#e07a3f", "stopped": "#9a9a9a",
    "recycling": "#9b6fc3", "failed": "#d43c3c", "unknown": "#eeeeee",
}
# The events that mark a step of a walk, and how the mark reads.
STEPS = {"walk_domain": "UD {domain}", "walk_paused": "paused", "walk_halted": "halted",
         "walk_rollback_domain": "back UD {domain}", "operation_ended": "{outcome}"}
WIDTH, LABEL, ROW, HEAD, BAND = 960, 130, 16, 28, 70


@dataclass
class Row:
    instance: str
    domain: int


def _x(t: float, began: float, ended: float) -> float:
    span = max(ended - began, 0.001)
    return LABEL + (WIDTH - LABEL - 10) * min(max((t - began) / span, 0.0), 1.0)


def segments(instance: str, events: Sequence[dict[str, Any]], began: float,
             ended: float) -> list[tuple[float, float, str]]:
    """(from, to, state) of `instance` over the window: its state when the window opens
    is the last it changed to before."""
    state, since = "unknown", began
    found: list[tuple[float, float, str]] = []
    for event in events:
        if event.get("event") != "state" or event.get("instance") != instance:
            continue
        t = seconds(event.get("timestamp"))
        if t is None:
            continue
        if t <= began:
            state = str(event.get("state"))
            continue
        if t > ended:
            break
        found.append((since, t, state))
        state, since = str(event.get("state")), t
    found.append((since, ended, state))
    return [(a, b, s) for a, b, s in found if b > a]


def _rates(samples: Sequence[Sample]) -> list[tuple[float, float, float]]:
    """(time, requests/s, failed/s) between consecutive samples, every endpoint summed."""
    rates = []
    for before, after in itertools.pairwise(samples):
        dt = after.time - before.time
        if dt <= 0:
            continue
        served = sum(after.requests.values()) - sum(before.requests.values())
        failed = sum(after.failed.values()) - sum(before.failed.values())
        rates.append((after.time, max(served, 0.0) / dt, max(failed, 0.0) / dt))
    return rates


def render(rows: Sequence[Row], events: Sequence[dict[str, Any]], began: float, ended: float,
           samples: Sequence[Sample] = (), walk: str | None = None) -> str:
    """The picture of the window from `began` to `ended`; `walk` picks the steps marked."""
    ordered = sorted(rows, key=lambda r: (r.domain, r.instance))
    body: list[str] = []
    y = HEAD
    domain: int | None = None
    for row in ordered:
        if row.domain != domain:
            domain = row.domain
            body.append(f'<text x="4" y="{y + 12}" font-size="11" font-weight="bold">'
                        f"UD {domain}</text>")
            y += ROW
        body.append(f'<text x="14" y="{y + 12}" font-size="11">{escape(row.instance)}</text>')
        for a, b, state in segments(row.instance, events, began, ended):
            x0, x1 = _x(a, began, ended), _x(b, began, ended)
            body.append(
                f'<rect class="seg" data-instance="{escape(row.instance)}" '
                f'data-state="{escape(state)}" x="{x0:.1f}" y="{y + 2}" '
                f'width="{max(x1 - x0, 0.5):.1f}" height="{ROW - 4}" '
                f'fill="{COLOURS.get(state, "#777777")}"><title>{escape(row.instance)}: '
                f"{escape(state)}, {a - began:+.1f}s to {b - began:+.1f}s</title></rect>")
        y += ROW
    rows_end = y
    for event in events:
        label = STEPS.get(str(event.get("event")))
        t = seconds(event.get("timestamp"))
        if label is None or t is None or not began <= t <= ended:
            continue
        if walk is not None and event.get("walk", event.get("operation")) != walk:
            continue
        x = _x(t, began, ended)
        text = escape(label.format_map({k: event.get(k, "") for k in ("domain", "outcome")}))
        body.append(f'<g class="step" data-step="{text}"><line x1="{x:.1f}" y1="14" '
                    f'x2="{x:.1f}" y2="{rows_end}" stroke="#333" stroke-dasharray="3,3"/>'
                    f'<text x="{x + 2:.1f}" y="12" font-size="10">{text}</text></g>')
    body += _axis(began, ended, rows_end)
    height = rows_end + 24
    rates = _rates([s for s in samples if began <= s.time <= ended])
    if rates:
        body += _band(rates, began, ended, height)
        height += BAND + 20
    body += _legend(height)
    height += 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" '
            f'data-walk="{escape(walk or "")}" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">' + "".join(body)
            + "</svg>")


def _axis(began: float, ended: float, y: int) -> list[str]:
    span = max(ended - began, 0.001)
    step = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
                 if span / s <= 10), 7200)
    marks = [f'<line x1="{LABEL}" y1="{y}" x2="{WIDTH - 10}" y2="{y}" stroke="#999"/>']
    t = 0
    while t <= span:
        x = _x(began + t, began, ended)
        marks.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#999"/>'
                     f'<text x="{x:.1f}" y="{y + 15}" font-size="10" '
                     f'text-anchor="middle">+{t}s</text>')
        t += step
    return marks


def _band(rates: list[tuple[float, float, float]], began: float, ended: float,
          top: int) -> list[str]:
    peak = max(max(r for _, r, _ in rates), max(f for _, _, f in rates), 1.0)

    def y(value: float) -> float:
        return top + BAND - BAND * value / peak

    served = " ".join(f"{_x(t, began, ended):.1f},{y(r):.1f}" for t, r, _ in rates)
    parts = [f'<text x="4" y="{top + 12}" font-size="11">requests/s</text>',
             f'<text x="4" y="{top + 26}" font-size="10" fill="#d43c3c">failed/s</text>',
             f'<text x="4" y="{top + 40}" font-size="10" fill="#666">peak {peak:.0f}/s</text>',
             f'<line x1="{LABEL}" y1="{top + BAND}" x2="{WIDTH - 10}" y2="{top + BAND}" '
             'stroke="#ccc"/>',
             f'<polyline id="requests" fill="none" stroke="#2b6cb0" points="{served}"/>']
    for t, _, failed in rates:
        if failed > 0:
            x = _x(t, began, ended)
            parts.append(f'<rect class="failed" x="{x - 1.5:.1f}" y="{y(failed):.1f}" '
                         f'width="3" height="{top + BAND - y(failed):.1f}" fill="#d43c3c"/>')
    return parts


def _legend(top: int) -> list[str]:
    parts, x = [], LABEL
    for state, colour in COLOURS.items():
        if state == "unknown":
            continue
        parts.append(f'<rect x="{x}" y="{top + 4}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 13}" y="{top + 13}" font-size="10">{state}</text>')
        x += 20 + 7 * len(state)
    return parts
