"""The census of back instances per role that the controller reports to systemd: kept
as instances change (O(1) a change), it says what a count over every instance says."""

from __future__ import annotations

import random

from rolehost.fabric.census import Census


def recount(instances: dict[str, tuple[str, bool]], roles: list[str]
            ) -> dict[str, tuple[int, int]]:
    counts = {role: (0, 0) for role in roles}
    for role, back in instances.values():
        ready, total = counts[role]
        counts[role] = (ready + back, total + 1)
    return counts


def test_the_census_matches_a_recount_through_any_history() -> None:
    rng = random.Random(23)
    roles = ["web", "worker"]
    census, truth = Census(roles), {}
    assert census.counts() == {"web": (0, 0), "worker": (0, 0)}
    for step in range(2000):
        action = rng.random()
        if action < 0.2 or not truth:
            instance = f"{rng.choice(roles)}_IN_{step}"
            truth[instance] = (instance.partition("_IN_")[0], False)
            census.add(truth[instance][0], instance)
        elif action < 0.3:
            instance = rng.choice(list(truth))
            del truth[instance]
            census.remove(instance)
        else:
            instance = rng.choice(list(truth))
            back = rng.random() < 0.5
            truth[instance] = (truth[instance][0], back)
            census.seen(instance, back)
        assert census.counts() == recount(truth, roles), step
