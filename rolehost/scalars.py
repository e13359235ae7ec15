"""How the definition writes its scalar values: durations, HOST:PORT addresses, and
settings given as text. Each is read by one function here, which the model's fields use
and so does every other reader (the CLI, run-instance, the test harness).

Patterns are for both engines that read them: pydantic's (Rust) and JSON Schema's
(ECMA-262, in editors). So they spell out their classes in ASCII: `\\d`, `\\w` and `\\s`
mean more under Unicode in one engine than in the other.
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


# --- addresses ---------------------------------------------------------------------

_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LS32 = rf"(?:{_H16}:{_H16}|{_OCTET}(?:\.{_OCTET}){{3}})"
# RFC 3986's IPv6address: 8 groups, or fewer around one "::", the last two perhaps an
# IPv4 address. No zone (`%eth0`): a metrics or health port has no use for link-local.
IPV6 = "(?:" + "|".join([
    f"(?:{_H16}:){{6}}{_LS32}",
    f"::(?:{_H16}:){{5}}{_LS32}",
    f"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    *(f"(?:(?:{_H16}:){{0,{n}}}{_H16})?::{rest}"
      for n, rest in ((1, f"(?:{_H16}:){{3}}{_LS32}"), (2, f"(?:{_H16}:){{2}}{_LS32}"),
                      (3, f"{_H16}:{_LS32}"), (4, _LS32), (5, _H16), (6, ""))),
]) + ")"
# A name or an IPv4 address (which a name's characters spell), or an IPv6 one in brackets:
# bare, its colons would make the port ambiguous (is ::1:8080 the port 8080 of ::1?).
ADDRESS_PATTERN = rf"^(?:([A-Za-z0-9._-]+)|\[({IPV6})\]):({_PORT})$"
_ADDRESS = re.compile(ADDRESS_PATTERN)
ADDRESS_SYNTAX = ("HOST:PORT, with a host (0.0.0.0 for every interface, [::1] for an IPv6 "
                  "address) and a port from 1 to 65535")


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) from HOST:PORT, IPv6 hosts in brackets (which the host loses: it is
    what a socket binds). ValueError naming the rule if `text` is none."""
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(f"expected {ADDRESS_SYNTAX}, got {text!r}")
    return match.group(1) or match.group(2), int(match.group(3))


# --- settings as text --------------------------------------------------------------

Setting = str | int | float | bool
# TOML's decimal numbers: what `name = TEXT` in rolehost.toml would read, ASCII digits.
_INTEGER = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)")
_NUMBER = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)(?:\.[0-9](?:_?[0-9])*)?"
                     r"(?:[eE][+-]?[0-9](?:_?[0-9])*)?")
_FLAGS = {"true": True, "false": False}
# Spellings a platform's environment uses for flags. Only a declared boolean takes them:
# without one, "on" or "no" is likelier a word and 1 or 0 a number.
_MORE_FLAGS = {"1": True, "yes": True, "on": True, "0": False, "no": False, "off": False}


def setting_from_text(text: str, declared: Setting | None = None) -> Setting:
    """The value of a setting given as text (`config set KEY=VALUE`, an environment
    variable under run-instance), read as the type of the value it replaces (`declared`):
    true or false (or 1, 0, yes, no, on, off, in any case) for a boolean; an integer or a
    finite number as TOML writes them, white space around them ignored; the text as it is
    for a string. With nothing declared, an integer, a finite number, true or false is
    one, and any other text a string. ValueError saying what was expected, never the
    text: it may be a secret's."""
    word = text.strip()
    integer, number = _integer(word), _number(word)
    if declared is None:
        if integer is not None:
            return integer
        return number if number is not None else _FLAGS.get(word, text)
    if isinstance(declared, bool):
        if (flag := {**_FLAGS, **_MORE_FLAGS}.get(word.lower())) is None:
            raise ValueError("true or false (or 1, 0, yes, no, on, off)")
        return flag
    if isinstance(declared, int):
        if integer is None:
            raise ValueError("an integer")
        return integer
    if isinstance(declared, float):
        if number is None:
            raise ValueError("a finite number")
        return number
    return text


def _integer(word: str) -> int | None:
    try:
        return int(word) if _INTEGER.fullmatch(word) else None
    except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
        return None


def _number(word: str) -> float | None:
    number = float(word) if _NUMBER.fullmatch(word) else math.inf
    return number if math.isfinite(number) else None
