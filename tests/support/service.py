"""A service that `make_service` (tests/conftest.py) wrote to a temporary folder: its
definition, and the probe file its roles write to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rolehost.testing import ServiceHarness, wait_until


@dataclass
class Service:
    toml: Path
    probe: Path

    def harness(self, **kwargs: object) -> ServiceHarness:
        return ServiceHarness(self.toml, **kwargs)  # type: ignore[arg-type]

    def probes(self) -> list[str]:
        return self.probe.read_text().splitlines() if self.probe.exists() else []

    def count(self, event: str) -> int:
        return sum(1 for line in self.probes() if line.split()[0] == event)

    def wait_probe(self, line: str, timeout: float = 30.0) -> None:
        wait_until(lambda: line in self.probes(), timeout, f"probe {line!r}",
                   lambda: "\n".join(self.probes()))


MakeService = Callable[..., Service]
