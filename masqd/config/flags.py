"""Values of the command-line flags shared with the upstream agent, parsed and validated.

:func:`validate_chain_name` checks ``--masq-chain``; :func:`parse_to_ports` turns ``--to-ports``
text into :class:`PortRange` intervals. Both raise :class:`~masqd.errors.FlagError` naming the flag,
the value and what would be valid. This module imports nothing else of :mod:`masqd.config`: the
model (:class:`~masqd.config.model.AgentOptions`) holds these values and checks the chain name
when it is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from masqd.errors import FlagError


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive source-port interval for ``--to-ports`` (``first`` .. ``last``, 1..65535)."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


_CHAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,27}")
_BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
_TARGET_NAMES = {"ACCEPT", "DROP", "RETURN", "QUEUE", "MASQUERADE", "SNAT", "DNAT", "REDIRECT", "MARK", "LOG"}


def validate_chain_name(name: str) -> str:
    """Return ``name`` if it can be an iptables chain masqd owns, else raise :class:`FlagError`."""
    if not isinstance(name, str) or not _CHAIN_NAME.fullmatch(name):
        raise FlagError(
            "masq-chain", name, "expected 1-28 characters of letters, digits, '_', '.', '-', not starting with '-' or '.'"
        )
    if name in _BUILTIN_CHAINS | _TARGET_NAMES:
        raise FlagError("masq-chain", name, "is a built-in chain or target name; choose a name of your own such as IP-MASQ-AGENT")
    return name


def parse_to_ports(text: str) -> tuple[PortRange, ...]:
    """Parse ``--to-ports`` (``1024-29999,32768-65535`` or ``8000``); empty text means no port mapping."""
    if text.strip() == "":
        return ()
    ranges: list[PortRange] = []
    for piece in text.split(","):
        match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", piece)
        if not match:
            raise FlagError("to-ports", text, f"{_which(piece, text)}not a port or a range; expected e.g. "
                                              "'1024-29999,32768-65535'")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if not 1 <= first <= last <= 65535:
            raise FlagError("to-ports", text, f"{_which(piece, text)}ports must be 1-65535 with the first not above "
                                              "the last")
        ranges.append(PortRange(first, last))
    ordered = sorted(ranges, key=lambda r: r.first)
    for before, after in zip(ordered, ordered[1:]):
        if after.first <= before.last:
            raise FlagError("to-ports", text, f"ranges {before} and {after} overlap; give each port once")
    return tuple(ranges)


def _which(piece: str, text: str) -> str:
    """The piece of a list a problem is about, when the flag's value (which the message shows
    already) lists more than it."""
    return f"{piece!r}: " if piece != text else ""
