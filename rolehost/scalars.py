"""How the definition writes its scalar values, each read by one function here, which
the model's fields use and so does every other reader (the CLI, run-instance, the test
harness).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# --- durations ---------------------------------------------------------------------

# Longer than any deadline or timeout has a use for, and far below what a wait can take
# (threading.TIMEOUT_MAX, about 292 years): a larger one is a typo that would hang `stop`.
MAX_DURATION = 7 * 24 * 3600
# Whole: no whitespace around it or inside (the schema's pattern refuses it too), and
# ASCII digits only (`\d` would take any script's, which JSON Schema's does not).
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?")
UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
DURATION_SYNTAX = ("seconds (`90`, `1.5`) or strings with a unit: `\"250ms\"`, `\"90s\"`, "
                   f"`\"5m\"`, `\"1h\"`, at most {MAX_DURATION // 86400} days")
_EXPECTED = "expected a duration such as 90, \"90s\", \"5m\" or \"1h\""


def parse_duration(value: object) -> float:
    """Seconds from `90`, `1.5`, `"90s"`, `"5m"`, `"1h"` or `"250ms"`: the one reading of a
    duration, wherever one is given (the definition, `--drain-delay`, `run_role`)."""
    if isinstance(value, bool):
        raise ValueError(_EXPECTED)
    if isinstance(value, int | float):
        exact: Fraction | float = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        # Exactly, and rounded once: "100ms" is the float 0.1, as "0.1s" is, so that a
        # bound means the same in every unit (and in the schema's patterns, which are exact).
        exact = Fraction(match.group(1)) * UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if (isinstance(exact, float) and not math.isfinite(exact)) or exact < 0:
        raise ValueError(f"a duration must be a finite number of seconds, 0 or more, got {value!r}")
    if exact > MAX_DURATION:
        raise ValueError(f"a duration must be at most {MAX_DURATION // 86400} days "
                         f"({MAX_DURATION:g} seconds), "
                         f"got {value!r}")
    return float(exact)
