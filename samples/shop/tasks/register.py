"""Startup task, every start: record this instance in os/instances.txt, idempotently."""

import os
from pathlib import Path

registry = Path(os.environ["ROLEHOST_OS_DIR"]) / "instances.txt"
me = os.environ["ROLEHOST_INSTANCE_ID"]
known = registry.read_text().split() if registry.exists() else []
if me not in known:
    registry.write_text("\n".join([*known, me]) + "\n")
print(f"registered {me}")
