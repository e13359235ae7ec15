"""The portal's pages, rendered on the server as HTML text: every value from the API is
escaped (an instance's last error is any text a role wrote). The parts a page refreshes
(the instances, the walk, the charts) are functions of their own, served alone too."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from html import escape
from typing import Any

from rolehost.control import wording
from rolehost.fabric.disks import Upgrade
from rolehost.observability import logs
from rolehost.portal import timeline
from rolehost.portal.source import Sample, seconds

# Per instance: the maintenance kinds, their labels, and whether to ask first (each of
# them stops the instance; a status check changes nothing).
INSTANCE_ACTIONS = [("restart", "Restart", True), ("reimage", "Reimage", True),
                    ("rebuild", "Rebuild", True), ("recycle", "Recycle", True),
                    ("status-check", "Run status checks", False)]
DESTRUCTIVE = {kind for kind, _, ask in INSTANCE_ACTIONS if ask}


def page(title: str, token: str, body: str) -> str:
    nav = "".join(f'<a href="{href}">{name}</a>' for href, name in (
        ("/", "Service"), ("/history", "History"), ("/logs", "Logs"), ("/metrics", "Metrics")))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="rolehost-token" content="{escape(token)}">
<title>{escape(title)} - rolehost portal</title>
<link rel="stylesheet" href="/static/portal.css"><script src="/static/portal.js" defer></script>
</head><body><nav><b>rolehost</b>{nav}</nav><main>{body}</main></body></html>"""


def service(status: dict[str, Any], staging: dict[str, Any] | None,
            packages: list[dict[str, Any]], token: str) -> str:
    roles = sorted({i["role"] for i in status["instances"]})
    role_options = "".join(f"<option>{escape(r)}</option>" for r in roles)
    versions = "".join(f'<option value="{escape(p["version"])}">{escape(p["version"])} '
                       f'({escape(", ".join(p["roles"]))})</option>' for p in packages)
    upgrades = "".join(
        f'<button data-act="/act/upgrade/{u.value}" data-form="upgrade" '
        f'data-confirm="Walk the {u.value} update across every update domain?">'
        f"Upgrade {u.value}</button>" for u in Upgrade)
    body = f"""
<h1>{escape(status["service"])}</h1>
<p class="meta">deployment {escape(status["deployment_id"][:12])}, version
{escape(str(status["version"] or "-"))}, controller pid {status["pid"]},
{status["upgrade_domains"]} update domains</p>
<div id="instances" data-poll="/part/instances">{slots(status, staging)}</div>
<section class="actions"><h2>Service</h2>
<form id="upgrade">{upgrades}
<label><input type="checkbox" name="manual"> manual (pause after each domain)</label></form>
<form id="deploy"><select name="version">{versions}</select>
<select name="slot"><option value="production">to production (in place, a walk)</option>
<option value="staging">to staging (beside production, on the staging ports)</option></select>
<label><input type="checkbox" name="rollback" checked> roll back on failure</label>
<label><input type="checkbox" name="manual"> manual</label>
<button data-act="/act/deploy" data-form="deploy"
 data-confirm="Deploy this version to the slot chosen?">Deploy</button>
<button data-act="/act/package" data-form="deploy">Package the app as a new version</button>
</form>
<form id="config"><select name="role">{role_options}</select>
<input name="assignments" placeholder="KEY=VALUE ..." size="30">
<button data-act="/act/config" data-form="config"
 data-confirm="Change these settings? Instances may recycle to apply them.">Config set</button>
</form>
<form id="scale"><select name="role">{role_options}</select>
<input name="count" type="number" min="1" size="4" placeholder="count">
<button data-act="/act/scale" data-form="scale"
 data-confirm="Scale this role? Scaling in stops instances.">Scale</button></form>
<form id="walkctl"><button data-act="/act/walk/next" data-form="walkctl"
 data-confirm="Go on with the walk: take the next update domain down?">Walk: next</button>
<button data-act="/act/walk/abort" data-form="walkctl"
 data-confirm="Abort the walk?">Walk: abort</button></form>
</section>
<h2>Progress</h2><pre id="output"></pre>
<h2>Walk</h2><div id="walk" data-poll="/part/walk">{walk_part(status, [], [])}</div>"""
    return page(status["service"], token, body)


def _rotation(i: dict[str, Any]) -> str:
    endpoints = [(name, ep) for name, ep in i["endpoints"].items() if "in_rotation" in ep]
    if not endpoints:
        return "-"
    if i["back"]:
        return "yes"
    why = [f"{name}: {ep.get('why_out') or 'in'}" for name, ep in endpoints]
    return "no (" + "; ".join(why) + ")" if i["state"] == "ready" else "no (not ready)"


def memory(instance: dict[str, Any]) -> str:
    """The Memory column: the host's tree's RSS as `rolehost status` shows it, and, when
    the role has a max_memory, that limit and how much of it is used."""
    used, limit = instance.get("memory_bytes"), instance.get("max_memory_bytes")
    shown = "-" if used is None else f"{used / 2**20:.0f}MB"
    if limit:
        shown += f" of {limit / 2**20:.0f}MB" + ("" if used is None else f" ({used / limit:.0%})")
    return shown


def slots(status: dict[str, Any], staging: dict[str, Any] | None) -> str:
    """Production's instances, and the staging deployment's beside them when there is
    one, each with the addresses its slot listens on: the part the page refreshes."""
    advice = "".join(f'<p class="advice">capacity: {escape(a)}</p>' for a in status["capacity"])
    if staging is None:
        return advice + _slot("Production", status)
    question = (f"Swap? Production's ports will send new requests to version "
                f"{staging['version']}, and staging's to version {status['version']}.")
    buttons = f"""<form id="slotctl">
<button data-act="/act/swap" data-confirm="{escape(question)}">Swap</button>
<button data-act="/act/slot/delete" data-slot="staging"
 data-confirm="Delete the staging deployment (version {escape(str(staging['version']))})?
 Its instances stop and its disks are removed.">Delete staging</button></form>"""
    return advice + _slot("Production", status) + _slot("Staging", staging, buttons)


def _slot(title: str, status: dict[str, Any], buttons: str = "") -> str:
    """A slot's heading (its version, deployment and listeners), its instances, and the
    buttons of the slot (`buttons`)."""
    slot = status.get("slot", "production")
    listening = ", ".join(f"{b['role']}.{b['endpoint']} on {b['address']}"
                          for b in status["balancers"]) or "no input endpoint"
    return (f'<section class="slot" id="slot-{escape(slot)}" data-slot="{escape(slot)}" '
            f'data-version="{escape(str(status["version"]))}">'
            f"<h2>{title} <small>version {escape(str(status['version'] or '-'))}, deployment "
            f"{escape(status['deployment_id'][:12])}</small></h2>"
            f'<p class="meta listening">{escape(listening)}</p>{instances(status)}{buttons}'
            "</section>")


def instances(status: dict[str, Any]) -> str:
    slot = status.get("slot", "production")
    head = ("Instance", "UD", "State", "Detail", "In rotation", "PID", "Restarts",
            "Ready since", "CPU", "Memory", "Last error", "")
    # The API runs status checks on production's instances only.
    offered = [a for a in INSTANCE_ACTIONS if slot == "production" or a[0] != "status-check"]
    where = "" if slot == "production" else f' data-slot="{escape(slot)}"'
    rows = []
    for i in status["instances"]:
        cpu = status.get("cpu", {}).get(i["id"])
        named = escape(i["id"]) + ("" if slot == "production" else f" ({escape(slot)})")
        buttons = "".join(
            f'<button data-act="/act/instance/{kind}" data-instance="{escape(i["id"])}"{where}'
            + (f' data-confirm="{label} {named}?"' if ask else "")
            + f">{label}</button>" for kind, label, ask in offered)
        cells = (i["id"], str(i["update_domain"]), i["state"], wording.instance_detail(i),
                 _rotation(i), str(i["pid"] or "-"), str(i["restarts"]),
                 logs.clock(i["ready_since"]), "-" if cpu is None else f"{cpu:.1f}%",
                 memory(i), i["last_error"] or "")
        rows.append(f'<tr data-instance="{escape(i["id"])}" data-state="{escape(i["state"])}"'
                    f'{where}>'
                    + "".join(f'<td class="c{n}">{escape(c)}</td>' for n, c in enumerate(cells))
                    + f'<td class="buttons">{buttons}</td></tr>')
    return ('<table class="instances"><tr>'
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def rows_of(status: dict[str, Any], names: Sequence[str] = ()) -> list[timeline.Row]:
    """The timeline's rows: the instances running, and those an operation touched that no
    longer are (a scale in), placed in the domain their index puts them in."""
    from rolehost.fabric.names import parse_instance_name

    known = {i["id"]: i["update_domain"] for i in status["instances"]}
    for name in names:
        if name not in known:
            known[name] = parse_instance_name(name)[1] % status["upgrade_domains"]
    return [timeline.Row(name, ud) for name, ud in known.items()]


def walk_part(status: dict[str, Any], events: Sequence[dict[str, Any]],
              samples: Sequence[Sample]) -> str:
    walk = status.get("walk")
    if walk is None:
        return "<p>No walk has run since the controller started.</p>"
    lines = "\n".join(wording.walk_summary(walk))
    now = time.time()
    began = _when("operation_began", walk, events) or now - walk["seconds"]
    ended = (now if walk["state"] in ("running", "paused", "halted")
             else _when("operation_ended", walk, events) or now)
    picture = timeline.render(rows_of(status), events, began - 1, ended + 1, samples, walk["id"])
    return (f'<pre class="walk" data-state="{escape(walk["state"])}">{escape(lines)}</pre>'
            + picture)


def _when(name: str, walk: dict[str, Any], events: Sequence[dict[str, Any]]) -> float | None:
    """When the walk's operation began or ended (`name`), by its event: the same time at
    every refresh, so a walk that is over is drawn the same and its part left alone."""
    for event in reversed(events):
        if event.get("event") == name and event.get("operation") == walk["id"]:
            return seconds(event.get("timestamp"))
    return None


def history(summary: dict[str, Any], token: str) -> str:
    rows = []
    for op in reversed(summary["operations"]):
        op_id, began, kind, outcome, took, touched, error = wording.operation_row(op)
        rows.append(f'<tr data-operation="{escape(op_id)}"><td><a href="/timeline/'
                    f'{escape(op_id)}">{escape(op_id)}</a></td>' + "".join(
                        f"<td>{escape(c)}</td>" for c in (began, kind, outcome, took,
                                                          touched, error)) + "</tr>")
    body = ("<h1>History</h1>" f'<p id="rate">{escape(wording.success_rate(summary))}</p>'
            '<table class="history"><tr><th>Operation</th><th>Began</th><th>Kind</th>'
            "<th>Outcome</th><th>Took</th><th>Instances</th><th>Error</th></tr>"
            + "".join(rows) + "</table>")
    return page("History", token, body)


def operation(op: dict[str, Any], status: dict[str, Any], events: Sequence[dict[str, Any]],
              samples: Sequence[Sample], token: str) -> str:
    op_id, began, kind, outcome, took, _touched, error = wording.operation_row(op)
    start, end = op["started"], op["ended"] or time.time()
    picture = timeline.render(rows_of(status, op["instances"]), events, start - 1, end + 1,
                              samples, op["id"])
    body = (f"<h1>{escape(kind)} <small>{escape(op_id)}</small></h1>"
            f'<p class="meta">began {escape(began)}, {escape(outcome)}, took {escape(took)}'
            f"{', ' + escape(error) if error else ''}</p>{picture}")
    return page(f"operation {op_id}", token, body)


def log_page(names: Sequence[str], shown: str | None, token: str) -> str:
    links = "".join(f'<a href="/logs?instance={escape(n)}">{escape(n)}</a> ' for n in names)
    what = shown or "controller events"
    query = f"?instance={escape(shown)}" if shown else ""
    body = (f'<h1>Logs: {escape(what)}</h1><p><a href="/logs">controller events</a> '
            f'{links}</p><pre id="log" data-follow="/part/log{query}"></pre>')
    return page(f"logs {what}", token, body)


def metrics_page(token: str) -> str:
    body = ('<h1>Metrics</h1><p class="meta">Sampled once a second while a page of the '
            'portal is open.</p><div id="charts" data-poll="/part/metrics"></div>')
    return page("Metrics", token, body)


def charts(samples: Sequence[Sample]) -> str:
    """Per endpoint: requests/s, failed requests/s and mean latency, as small charts."""
    endpoints = sorted({e for s in samples for e in s.requests})
    if not endpoints:
        return "<p>No endpoint is balanced, or no sample yet.</p>"
    parts = []
    for endpoint in endpoints:
        series: dict[str, list[tuple[float, float]]] = {
            "requests/s": [], "failed/s": [], "latency ms": []}
        for a, b in itertools.pairwise(samples):
            dt = b.time - a.time
            if dt <= 0:
                continue
            count = b.latency_count.get(endpoint, 0) - a.latency_count.get(endpoint, 0)
            total = b.latency_sum.get(endpoint, 0) - a.latency_sum.get(endpoint, 0)
            series["requests/s"].append(
                (b.time, (b.requests.get(endpoint, 0) - a.requests.get(endpoint, 0)) / dt))
            series["failed/s"].append(
                (b.time, (b.failed.get(endpoint, 0) - a.failed.get(endpoint, 0)) / dt))
            series["latency ms"].append((b.time, 1000 * total / count if count > 0 else 0.0))
        parts.append(f"<h2>{escape(endpoint)}</h2><div class='charts'>" + "".join(
            _spark(name, points) for name, points in series.items()) + "</div>")
    return "".join(parts)


def _spark(name: str, points: list[tuple[float, float]]) -> str:
    width, height = 260, 60
    if not points:
        return f"<figure><figcaption>{name}: -</figcaption></figure>"
    t0, t1 = points[0][0], max(points[-1][0], points[0][0] + 1)
    peak = max(max(v for _, v in points), 1e-9)
    line = " ".join(f"{(t - t0) / (t1 - t0) * width:.1f},{height - v / peak * height:.1f}"
                    for t, v in points)
    return (f'<figure><figcaption>{name}: {points[-1][1]:.1f} (peak {peak:.1f})'
            f'</figcaption><svg class="spark" width="{width}" height="{height}">'
            f'<polyline fill="none" stroke="#2b6cb0" points="{line}"/></svg></figure>')
