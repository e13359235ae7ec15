"""How the definition writes its scalar values: durations, HOST:PORT addresses, and
settings given as text. Each is read by one function here, which the model's fields use
and so does every other reader (the CLI, run-instance, the test harness). Durations and
addresses have the JSON-schema pattern that accepts exactly the strings the function does.

Patterns are for both engines that read them: pydantic's (Rust) and JSON Schema's
(ECMA-262, in editors). So they spell out their classes in ASCII: `\\d`, `\\w` and `\\s`
mean more under Unicode in one engine than in the other.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from rolehost.limits import MAX_INSTANCES as MAX_INSTANCES
from rolehost.limits import MIN_INSTANCES as MIN_INSTANCES

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


def duration_pattern(low: float = 0, low_included: bool = True,
                     high: float = MAX_DURATION) -> str:
    """The pattern of the duration strings from `low` to `high` seconds: each unit's
    number is held to the bounds divided by the unit, digit by digit. The bounds are read
    as the decimals they are written as (0.1 is a tenth), as `parse_duration` reads the
    strings."""
    lowest, highest = Fraction(repr(float(low))), Fraction(repr(float(high)))
    units = []
    for unit, size in UNITS.items():
        suffix = "s?" if unit == "s" else unit  # a bare number string is seconds
        number = _at_most(highest / size)
        if lowest or not low_included:
            number = f"(?={_at_least(lowest / size, low_included)}{suffix}$){number}"
        units.append(number + suffix)
    return "^(?:" + "|".join(units) + ")$"


_DIGITS = "[0-9]"


def _digits(count: int) -> str:
    return "" if count == 0 else _DIGITS if count == 1 else f"{_DIGITS}{{{count}}}"


def _between(first: int, last: int) -> str:
    """A class of the digits `first` to `last` ('' if none)."""
    if first > last:
        return ""
    return str(first) if first == last else f"[{first}-{last}]"


def _integers_above(n: int) -> str:
    """Integers over `n` without leading zeros."""
    text = str(n)
    options = [f"[1-9]{_DIGITS}{{{len(text)},}}"]  # more digits
    for i, digit in enumerate(text):
        if higher := _between(int(digit) + 1, 9):
            options.append(f"{text[:i]}{higher}{_digits(len(text) - i - 1)}")
    return "(?:" + "|".join(options) + ")"


def _integers_below(n: int) -> str:
    """Integers from 0 to `n` - 1 without leading zeros (`n` > 0)."""
    text = str(n)
    options = ["0"]
    if len(text) > 1:
        options.append(f"[1-9]{_DIGITS}{{0,{len(text) - 2}}}")  # fewer digits
    for i, digit in enumerate(text):
        if lower := _between(1 if i == 0 else 0, int(digit) - 1):
            options.append(f"{text[:i]}{lower}{_digits(len(text) - i - 1)}")
    return "(?:" + "|".join(options) + ")"


def _expansion(fraction: Fraction) -> tuple[str, str]:
    """The decimal digits of `fraction` (0 < fraction < 1): those before the repeating
    block, and the block ('' if the expansion ends)."""
    digits: list[str] = []
    seen: dict[int, int] = {}
    remainder = fraction.numerator
    while remainder and remainder not in seen:
        seen[remainder] = len(digits)
        remainder *= 10
        digits.append(str(remainder // fraction.denominator))
        remainder %= fraction.denominator
    text = "".join(digits)
    if not remainder:
        return text, ""
    return text[:seen[remainder]], text[seen[remainder]:]


def _digits_after(fixed: str, block: str, above: bool) -> str:
    """The digit strings that first differ from the expansion `fixed` + `block`* with a
    larger digit (`above`) or a smaller one, then go on with any digits."""
    def differing(prefix: str, expected: str) -> list[str]:
        options = []
        for i, digit in enumerate(expected):
            if other := _between(int(digit) + 1, 9) if above else _between(0, int(digit) - 1):
                options.append(f"{prefix}{expected[:i]}{other}")
        return options

    options = differing("", fixed)
    if block:
        options += differing(f"{fixed}(?:{block})*", block)
    return "(?:" + "|".join(options) + f"){_DIGITS}*" if options else "(?!)"


def _at_least(bound: Fraction, included: bool) -> str:
    """Decimal strings ([0-9]+, then perhaps . and [0-9]+) worth `bound` or more (more
    than `bound` if not `included`)."""
    whole, part = math.floor(bound), bound - math.floor(bound)
    fraction = f"(?:\\.{_DIGITS}+)?"
    options = [f"0*{_integers_above(whole)}{fraction}"]
    same = "0+" if whole == 0 else f"0*{whole}"
    if not part:
        options.append(same + (fraction if included else f"\\.{_DIGITS}*[1-9]{_DIGITS}*"))
    else:
        fixed, block = _expansion(part)
        above = [_digits_after(fixed, block, above=True)]
        if not block:  # the bound's digits, then any (more than it: some not 0)
            above.append(f"{fixed}{_DIGITS}*" if included
                         else f"{fixed}{_DIGITS}*[1-9]{_DIGITS}*")
        options.append(f"{same}\\.(?:{'|'.join(above)})")
    return "(?:" + "|".join(options) + ")"


def _at_most(bound: Fraction) -> str:
    """Decimal strings worth `bound` or less."""
    whole, part = math.floor(bound), bound - math.floor(bound)
    fraction = f"(?:\\.{_DIGITS}+)?"
    options = [f"0*{_integers_below(whole)}{fraction}"] if whole else []
    same = "0+" if whole == 0 else f"0*{whole}"
    if not part:
        options.append(f"{same}(?:\\.0+)?")
    else:
        fixed, block = _expansion(part)
        # Below at the first digit that differs; or a prefix of the expansion, which is
        # less (or, for an expansion that ends, equal with zeros after).
        prefixes = [fixed[:i] for i in range(1, len(fixed))]
        prefixes += [f"{fixed}0*"] if not block else [fixed] * bool(fixed) + [
            f"{fixed}(?:{block})*{block[:i]}" for i in range(1, len(block) + 1)]
        below = [_digits_after(fixed, block, above=False), *prefixes]
        options.append(f"{same}(?:\\.(?:{'|'.join(below)}))?")
    return "(?:" + "|".join(options) + ")"


# --- sizes -------------------------------------------------------------------------

# A memory size, as PM2's max_memory_restart writes it: a whole number and a unit, binary
# as `ps` and `top` count (1MB is 1,048,576 bytes). At most 10 digits: a bigger one is a
# typo, not a machine.
SIZE_UNITS = {"KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
SIZE_PATTERN = r"^[1-9][0-9]{0,9}(?:KB|MB|GB)$"
_SIZE = re.compile(r"([1-9][0-9]{0,9})(KB|MB|GB)")
SIZE_SYNTAX = ('a whole number and a unit: `"512KB"`, `"200MB"`, `"2GB"` (binary: 1MB is '
               "1,048,576 bytes)")


def check_size(value: object) -> object:
    """`value` if it is a size as SIZE_PATTERN writes it; ValueError saying what is expected."""
    if not isinstance(value, str) or not _SIZE.fullmatch(value):
        raise ValueError(f"expected a size such as \"200MB\", \"512KB\" or \"2GB\", "
                         f"got {value!r}")
    return value


def parse_size(text: str) -> int:
    """Bytes from a size such as `"200MB"` (one that `check_size` passed)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


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


# --- port ranges -------------------------------------------------------------------

# "10100-10109" or "10100": the schema's pattern takes two ports, the model also their
# order (which a pattern cannot compare).
PORT_RANGE_PATTERN = rf"^{_PORT}(?:-{_PORT})?$"
_PORT_RANGE = re.compile(PORT_RANGE_PATTERN)


def parse_port_range(value: str) -> range:
    """The ports of `"FIRST-LAST"` (both included) or `"PORT"`. ValueError naming the
    rule if `value` is none."""
    if not _PORT_RANGE.fullmatch(value):
        raise ValueError("expected a port or a range of ports from 1 to 65535, such as "
                         f"\"10100-10109\", got {value!r}")
    first_text, _, last_text = value.partition("-")
    first, last = int(first_text), int(last_text or first_text)
    if first > last:
        raise ValueError(f"expected a range from a lower port to a higher one, got {value!r}")
    return range(first, last + 1)


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
