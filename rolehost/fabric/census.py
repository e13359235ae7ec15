"""How many instances of each role are back, kept as they change.

The controller tells systemd (READY=1, STATUS) the (back, total) of every role after
each state change of an instance. Counted over every instance at each change, that was
O(N) per change and O(N^2) for a start or a walk of N instances; kept here, each change
costs O(1) and a report O(roles).
"""

from __future__ import annotations

from collections.abc import Iterable


class Census:
    """(back, total) per role, from what each instance was last seen as."""

    def __init__(self, roles: Iterable[str]) -> None:
        self._roles: dict[str, list[int]] = {role: [0, 0] for role in roles}
        self._back: dict[str, tuple[str, bool]] = {}  # instance id: (role, back)

    def add(self, role: str, instance: str, back: bool = False) -> None:
        """A new instance, counted in its role's total (and back, if it is)."""
        if instance in self._back:
            self.seen(instance, back)
            return
        self._back[instance] = (role, back)
        counts = self._roles.setdefault(role, [0, 0])
        counts[0] += back
        counts[1] += 1

    def seen(self, instance: str, back: bool) -> None:
        """An instance changed: whether it is back now."""
        role, was = self._back[instance]
        if was != back:
            self._back[instance] = (role, back)
            self._roles[role][0] += 1 if back else -1

    def remove(self, instance: str) -> None:
        role, back = self._back.pop(instance)
        self._roles[role][0] -= back
        self._roles[role][1] -= 1

    def counts(self) -> dict[str, tuple[int, int]]:
        return {role: (back, total) for role, (back, total) in self._roles.items()}
