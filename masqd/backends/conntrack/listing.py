"""The ``conntrack`` tool's listing read into flows, and its delete command for one (pure).

``conntrack -L -f ipv4 -o extended`` prints one entry per line::

    ipv4     2 udp      17 29 src=10.244.1.2 dst=203.0.113.2 sport=40000 dport=53 [UNREPLIED] \
        src=203.0.113.2 dst=172.30.0.1 sport=53 dport=40000 mark=0 zone=5 use=1

the original tuple's ``key=value`` fields first, then the reply tuple's (a second ``src=``
starts it), then the entry's own (``zone=``, or ``zone-orig=`` / ``zone-reply=`` for a
directional zone). The protocol is the fourth word, its number the fifth.
"""

from __future__ import annotations

import ipaddress

from masqd.flows import Flow

_FAMILY_WORDS = {4: "ipv4", 6: "ipv6"}


def parse_listing(text: str, family: int) -> list[Flow]:
    """The entries of ``family`` in ``conntrack -L -o extended`` output; lines that are not an
    entry of that family are skipped. ``ValueError`` names a line whose fields cannot be read."""
    flows = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if len(words) < 5 or words[0] != _FAMILY_WORDS[family]:
            continue
        try:
            flows.append(_flow(words, family))
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"conntrack -L line {number}: cannot read {line.strip()!r}: {exc}") from None
    return flows


def _flow(words: list[str], family: int) -> Flow:
    protocol = int(words[3])
    tuples: list[dict[str, str]] = [{}, {}]
    side = -1
    zone = 0
    for word in words[4:]:
        key, equals, value = word.partition("=")
        if not equals:
            continue
        if key == "src":
            side += 1
        if key.startswith("zone"):
            zone = max(zone, int(value))
        elif 0 <= side <= 1 and key in ("src", "dst", "sport", "dport"):
            tuples[side].setdefault(key, value)
    original, reply = tuples
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address

    def port(fields: dict[str, str], key: str) -> int | None:
        return int(fields[key]) if key in fields else None

    return Flow(family=family, protocol=protocol, source=address(original["src"]),
                destination=address(original["dst"]), reply_source=address(reply["src"]),
                reply_destination=address(reply["dst"]), source_port=port(original, "sport"),
                destination_port=port(original, "dport"), zone=zone)


def delete_command(flow: Flow) -> list[str]:
    """``conntrack -D`` arguments deleting ``flow``: its original tuple, in zone 0."""
    command = ["-D", "-f", _FAMILY_WORDS[flow.family], "-w", "0", "-p", str(flow.protocol), "-s", str(flow.source),
               "-d", str(flow.destination)]
    if flow.source_port is not None and flow.destination_port is not None:
        command += ["--sport", str(flow.source_port), "--dport", str(flow.destination_port)]
    return command
