"""Instance names: `ROLE/INDEX` as users write them, `ROLE_IN_INDEX` as the platform
does (and as ids, log files and folders are named)."""

from __future__ import annotations

import re

from rolehost.limits import NAME_PATTERN


def instance_id(role: str, index: int) -> str:
    return f"{role}_IN_{index}"


def parse_instance_name(name: str) -> tuple[str, int]:
    """`web/0` or `web_IN_0` -> ("web", 0)."""
    role, sep, index = name.rpartition("/") if "/" in name else name.rpartition("_IN_")
    # the role as the definition names one: `a/b/0` or `../x/0` name no role (nor a file)
    if not sep or not re.fullmatch(NAME_PATTERN, role) or not index.isdigit():
        raise ValueError(f"not an instance name: {name!r} (expected ROLE/INDEX or ROLE_IN_INDEX)")
    return role, int(index)
