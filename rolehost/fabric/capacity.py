"""Capacity advice: can each role lose an update domain without falling over?

A walk takes one update domain down at a time; the remaining instances carry its load.
A role needs 1/UDs of its capacity spare to survive that (2 UDs: 50 %, 5 UDs: 20 %);
from each instance's measured CPU, estimate the load on the others while the busiest
domain is down, and warn above 100 % of their capacity (one core each: a Python
process runs its Python on one core at a time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from rolehost.definition import Definition


def static_advice(definition: Definition) -> list[str]:
    """What the definition alone says (shown by `rolehost check` too)."""
    uds = definition.service.upgrade_domains
    advice = []
    for name, role in definition.roles.items():
        if role.instances == 1:
            advice.append(f"role {name} has one instance: it is down during every walk and "
                          "maintenance event (the platform's SLA needs two)")
        else:
            domains = min(uds, role.instances)
            spare = math.ceil(role.instances / domains) / role.instances
            advice.append(f"role {name}: {role.instances} instances over {domains} update "
                          f"domains; to lose one, it needs {spare:.0%} of its capacity spare")
    return advice


def load_warnings(
    definition: Definition, cpu: Mapping[str, tuple[str, int, float]]
) -> list[str]:
    """`cpu`: instance id -> (role, update domain, CPU % of one core over a recent window)."""
    warnings = []
    for name in definition.roles:
        mine = [(ud, load) for role, ud, load in cpu.values() if role == name]
        if len(mine) < 2:
            continue
        total = sum(load for _, load in mine)
        by_domain: dict[int, float] = {}
        for ud, load in mine:
            by_domain[ud] = by_domain.get(ud, 0.0) + load
        busiest = max(by_domain, key=lambda ud: by_domain[ud])
        remaining = sum(1 for ud, _ in mine if ud != busiest)
        if remaining == 0:
            continue
        each = total / remaining
        if each > 100.0:
            warnings.append(
                f"role {name}: with update domain {busiest} down, the other {remaining} "
                f"instance(s) would each carry {each:.0f}% of a core (now {total:.0f}% in "
                "all): add instances or update domains before the next walk"
            )
    return warnings
