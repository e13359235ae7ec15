"""`rolehost export haproxy`: a haproxy.cfg in front of the external endpoints.

Every external endpoint (`balancer = "external"`) gets a frontend on its `port` and a
backend listing a server per instance index, each on its fixed private port with an
agent-check on its readiness port (rolehost/balancer/external.py). `slots` lists more
servers than the role runs: a scale-out within them needs no reload (a slot with no
instance fails its connect check and is DOWN); beyond them, export again and reload.
"""

from __future__ import annotations

from pathlib import Path

from rolehost.definition import Balance, Definition, Endpoint, Protocol

# HAProxy answers 503 at once while a backend has no server up (its `timeout queue` holds
# requests only while servers are at their maxconn). This action holds a request while no
# server is UP and undrained, up to the endpoint's queue_timeout, as rolehost's own
# balancer does: a walk of a one-instance role, or a role starting, costs no request.
WAIT_LUA = """\
-- Written by `rolehost export haproxy`: hold a request while its backend has no server
-- in rotation (UP, not drained), up to a deadline in milliseconds.
local function usable(backend)
  for _, server in pairs(backend.servers) do
    local stats = server:get_stats()
    if string.sub(stats.status, 1, 2) == "UP" and tonumber(stats.weight) > 0 then
      return true
    end
  end
  return false
end

core.register_action("rolehost_wait_ready", {"http-req", "tcp-req"}, function(txn, name, ms)
  local backend = core.backends[name]
  local left = tonumber(ms)
  while left > 0 and not usable(backend) do
    core.msleep(50)
    left = left - 50
  end
end, 2)
"""
LUA_FILE = "rolehost-wait.lua"

# Idempotent methods (RFC 9110 9.2.2): the only ones retried once they reached a server.
IDEMPOTENT = "GET HEAD OPTIONS TRACE PUT DELETE"


def external(definition: Definition) -> list[tuple[str, str, Endpoint, int]]:
    """(role, endpoint, its model, instances) of every external endpoint."""
    return [(role_name, name, ep, role.instances)
            for role_name, role in definition.roles.items()
            for name, ep in role.endpoints.items() if ep.external]


def config(definition: Definition, lua: Path, slots: int = 0,
           socket: Path | None = None) -> str:
    """The haproxy.cfg text. `lua`: where WAIT_LUA is. `slots`: servers per endpoint, at
    least the role's instances. `socket`: the runtime API's Unix socket (mode 0600)."""
    service = definition.service.name
    lines = [
        f"# Written by `rolehost export haproxy` for service {service}: in front of its",
        "# external endpoints. Each server is one instance's private port; its agent-check",
        "# asks rolehost whether the instance is in rotation (ready, drain, maint, down).",
        "global",
        "    log stderr format short local0 notice",
        f"    lua-load {lua}",
    ]
    if socket is not None:
        lines.append(f"    stats socket {socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    log global",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout check 1s",
        "    # While every ready server is at its maxconn, a request waits this long.",
        "    timeout queue 10s",
        "    # A connection refused or reset before an answer (an instance that just died)",
        "    # is tried again on another server, never twice on the same one.",
        "    retries 3",
        "    option redispatch 1",
        "",
    ]
    for role, name, ep, instances in external(definition):
        label = f"{role}_{name}"
        http = ep.protocol is Protocol.http
        queue = f"{ep.queue_timeout:g}s"
        balance = "leastconn" if ep.balance is Balance.least_outstanding else "roundrobin"
        lines += [
            f"frontend {label}",
            f"    mode {'http' if http else 'tcp'}",
            f"    bind {ep.host}:{ep.port}",
            f"    default_backend {label}",
            "",
            f"backend {label}",
            f"    mode {'http' if http else 'tcp'}",
            f"    balance {balance}",
            f"    timeout queue {queue}",
            # While no server is in rotation, wait for one (WAIT_LUA) up to queue_timeout.
            f"    {'http' if http else 'tcp'}-request "
            f"{'' if http else 'content '}lua.rolehost_wait_ready {label} "
            f"{round(ep.queue_timeout * 1000)}",
        ]
        if http:
            lines += [
                # A connection to an instance per request: its established connections are
                # then its requests in flight, which rolehost's drain waits for.
                "    option http-server-close",
                "    retry-on conn-failure empty-response",
                f"    http-request disable-l7-retry unless {{ method {IDEMPOTENT} }}",
            ]
        for index in range(max(instances, slots)):
            lines.append(
                f"    server {role}_IN_{index} {ep.host}:{ep.private_port(index)} "
                f"check inter 1s fall 1 rise 1 agent-check agent-addr {ep.readiness_host} "
                f"agent-port {ep.readiness_port_of(index)} agent-inter 250ms "
                'agent-send "agent\\n"')
        lines.append("")
    return "\n".join(lines)


def write(definition: Definition, output: Path, slots: int = 0,
          socket: Path | None = None) -> Path:
    """Write haproxy.cfg and the Lua file it loads into `output`."""
    output.mkdir(parents=True, exist_ok=True)
    lua = output.resolve() / LUA_FILE
    lua.write_text(WAIT_LUA)
    target = output / "haproxy.cfg"
    target.write_text(config(definition, lua, slots, socket))
    return target
