"""Discovery's table, the records every host starts with: built and encoded once per
change of a record, never once per host (the real controller's side is in
tests/test_discovery.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from rolehost import protocol
from rolehost.fabric.discovery import Discovery, record
from rolehost.fabric.instance import Instance
from rolehost.observability import metrics


class Host:
    """What discovery writes to: the lines, as they would reach a host."""

    def __init__(self) -> None:
        self.running = True
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)


class Fake:
    """The parts of an Instance a record is made of."""

    def __init__(self, index: int) -> None:
        self.id, self.role_name, self.index = f"w_IN_{index}", "w", index
        self.update_domain, self.back, self.port = index % 2, False, 30000 + index
        self.process: Host | None = None

    def addresses(self) -> dict[str, dict[str, Any]]:
        return {"rpc": {"host": "127.0.0.1", "port": self.port, "protocol": "tcp"}}


def _encoded() -> float:
    return metrics.REGISTRY.get_sample_value("rolehost_discovery_encoded_total") or 0.0


def _instances(*fakes: Fake) -> list[Instance]:
    return [cast(Instance, f) for f in fakes]


def test_the_table_is_encoded_once_per_change_and_is_always_the_truth() -> None:
    fakes = [Fake(i) for i in range(4)]
    discovery = Discovery()
    for instance in _instances(*fakes):
        discovery.add(instance)
    before = _encoded()
    table = discovery.table()
    assert json.loads(table) == {f.id: record(cast(Instance, f)) for f in fakes}
    assert _encoded() - before == 4
    # Many hosts start, nothing changed: the same bytes, nothing built or encoded again.
    assert all(discovery.table() is table for _ in range(10))
    # Seen without a change: still the same table.
    discovery.seen(cast(Instance, fakes[0]))
    assert discovery.table() is table and _encoded() - before == 4

    # One record changes (ready), another's port moves: two encodings, and the next
    # table says so; the others are not encoded again.
    fakes[1].back, fakes[2].port = True, 31000
    for fake in fakes[1:3]:
        discovery.seen(cast(Instance, fake))
    assert _encoded() - before == 6
    assert json.loads(discovery.table()) == {f.id: record(cast(Instance, f)) for f in fakes}

    # A scale-out's instance is in the next table, a removed one is not.
    new = Fake(9)
    discovery.add(cast(Instance, new))
    discovery.remove(cast(Instance, fakes[3]))
    assert json.loads(discovery.table()) == {
        f.id: record(cast(Instance, f)) for f in [*fakes[:3], new]}
    assert _encoded() - before == 7


def test_a_batch_is_encoded_once_for_every_host_and_an_assign_carries_the_table() -> None:
    fakes = [Fake(i) for i in range(3)]
    discovery = Discovery()
    for instance in _instances(*fakes):
        discovery.add(instance)
    table = discovery.table()  # the first host starts: these are known as they are now
    for fake in fakes:
        fake.process = Host()

    async def change() -> None:
        discovery.seen(cast(Instance, fakes[0]))  # unchanged since the table: not sent
        fakes[2].back = True
        discovery.seen(cast(Instance, fakes[2]))
        await asyncio.sleep(0)  # the batch goes at the end of this turn of the loop

    before = _encoded()
    asyncio.run(change())
    assert _encoded() - before == 1  # the one record that changed, for the 3 hosts
    lines = [host.lines for host in (f.process for f in fakes) if host is not None]
    assert lines[0] == lines[1] == lines[2] and len(lines[0]) == 1
    assert protocol.decode(lines[0][0]) == {
        "type": "peers", "instances": [record(cast(Instance, fakes[2]))]}

    # An assign's line is the message with the table as it was encoded, parsed whole.
    line = protocol.encode({"type": "assign", "cwd": "/"}, {"peers": table})
    assert line.endswith(b"}\n") and b"\n" not in line[:-1]
    assigned = protocol.decode(line)
    assert assigned["cwd"] == "/" and assigned["peers"] == json.loads(table)
