"""Register this instance in the machine's config, like `netsh add` or `appcmd add`:
it fails when the entry already exists. `--idempotent` checks first."""

import os
import sys
from pathlib import Path

config = Path(os.environ["ROLEHOST_OS_DIR"]) / "machine.conf"
entry = f"instance={os.environ['ROLEHOST_INSTANCE_ID']}\n"
existing = config.read_text() if config.exists() else ""
if entry in existing:
    if "--idempotent" in sys.argv:
        print("already registered")
        sys.exit(0)
    print(f"ERROR: duplicate entry {entry.strip()!r} in {config}", file=sys.stderr)
    sys.exit(183)  # ERROR_ALREADY_EXISTS, as the platform's tools say it
config.write_text(existing + entry)
print("registered")
