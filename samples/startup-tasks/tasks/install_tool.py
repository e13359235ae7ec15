"""Install a small tool into os/ (like a runtime or an agent installed by a startup task)."""

import os
import stat
from pathlib import Path

tool = Path(os.environ["ROLEHOST_OS_DIR"]) / "tools" / "greet"
tool.parent.mkdir(parents=True, exist_ok=True)
tool.write_text("#!/bin/sh\necho \"hello from $1\"\n")
tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
print(f"installed {tool}")
