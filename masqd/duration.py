"""Go duration strings (``time.ParseDuration`` / ``Duration.String``), exact to the nanosecond.

The upstream agent reads ``resyncInterval`` with Go's parser, so masqd accepts exactly the same
language: an optional sign, then one or more ``<number><unit>`` pairs, where the number may have a
fraction (``1.5h``, ``.5s``) and the unit is one of ``ns us µs μs ms s m h``; ``"0"`` alone is zero.
Values are kept as integer nanoseconds so that parse/format round-trips are exact.
"""

from __future__ import annotations

import re

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # µ MICRO SIGN
    "\u03bcs": 1_000,  # μ GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_COMPONENT = re.compile(r"([0-9]*)(?:\.([0-9]*))?([a-zµμ]+)")  # ASCII digits only, as Go
_MAX_NS = 2**63 - 1  # Go's time.Duration is an int64: -2**63 .. 2**63-1


def parse_go_duration(text: str) -> int:
    """Return the duration ``text`` denotes, in nanoseconds.

    Raises ``ValueError`` naming the text and the accepted form when it is not a Go duration.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as '60s', got {type(text).__name__}")
    original = text
    sign = 1
    if text[:1] in "+-" and text:
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValueError(f"invalid duration {original!r}: expected e.g. '60s', '5m', '1m30s', '500ms'")
    total = 0
    pos = 0
    while pos < len(text):
        match = _COMPONENT.match(text, pos)
        if match is None or (not match.group(1) and not match.group(2)):
            raise ValueError(f"invalid duration {original!r}: expected e.g. '60s', '5m', '1m30s', '500ms'")
        whole, frac, unit = match.group(1), match.group(2) or "", match.group(3)
        if unit not in _UNIT_NS:
            raise ValueError(
                f"invalid duration {original!r}: unknown unit {unit!r} (valid units: ns, us, ms, s, m, h)"
            )
        scale = _UNIT_NS[unit]
        value = int(whole or "0") * scale
        if frac:
            # exact: frac digits / 10**len(frac) * scale, truncated like Go does
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        if total > _MAX_NS + (sign < 0):
            raise ValueError(f"invalid duration {original!r}: out of range (max ~2562047h)")
        pos = match.end()
    return sign * total


def format_go_duration(ns: int) -> str:
    """Format nanoseconds the way Go's ``Duration.String`` does: ``1m30s``, ``500ms``, ``1h0m0s``, ``0s``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000_000_000:
        for unit, scale, digits in (("ns", 1, 0), ("µs", 1_000, 3), ("ms", 1_000_000, 6)):
            if u < scale * 1000:
                return sign + _decimal(u // scale, u % scale, digits) + unit
    seconds, rest = divmod(u, 1_000_000_000)
    text = _decimal(seconds % 60, rest, 9) + "s"
    minutes = seconds // 60
    if minutes:
        text = f"{minutes % 60}m" + text
        hours = minutes // 60
        if hours:
            text = f"{hours}h" + text
    return sign + text


def _decimal(whole: int, frac: int, digits: int) -> str:
    """``whole.frac`` where ``frac`` counts units of 10**-digits, without trailing zeros."""
    if not frac:
        return str(whole)
    return f"{whole}." + str(frac).rjust(digits, "0").rstrip("0")
