"""Telling masqd's own changes from everyone else's in ``nft monitor`` output (pure)."""

from __future__ import annotations

from masqd.backends.nftables.render import TABLE

#: What ``nft monitor`` prints after the changes of each transaction.
_GENERATION = "# new generation "
#: What it prints when the kernel dropped events it could not deliver (``ENOBUFS``); it goes on.
_LOST = "# ERROR"


class ChangeFilter:
    """Reads ``nft monitor`` output, a line at a time, and says when a transaction made by another
    process has changed masqd's tables. Pure: no I/O.

    The monitor prints one line per object a transaction added or removed (``delete element ip
    masqd nonmasq4 { 10.0.0.0/8 }``), then ``# new generation N by process PID (COMM)``. masqd's
    own writes are told apart by the table named ``marker`` that each of them adds and deletes
    (the PID would not do: the kernel reports it as the host sees it, not as masqd's container does).
    """

    def __init__(self, marker: str):
        self._marker = marker
        self._change: str | None = None  # the first line of this transaction touching masqd's tables
        self._own = False  # this transaction is masqd's
        #: How many of masqd's own transactions were seen: one proves the monitor listens.
        self.own_transactions = 0

    def feed(self, line: str) -> str | None:
        """Take one line; returns the first change of a foreign transaction that changed masqd's
        tables, and who made it (``...; by process PID (COMM)``, the PID as the host sees it),
        when ``line`` ends it, else ``None``."""
        if line.startswith(_GENERATION):
            self.own_transactions += self._own
            change = None if self._own or self._change is None else f"{self._change}; {_writer(line)}"
            self._change, self._own = None, False
            return change
        if line.startswith(_LOST):  # the kernel dropped events (socket buffer full): anything may have changed
            self._change, self._own = None, False
            return f"nft monitor: {line[2:].strip()}"
        words = line.split(" ", 4)
        if len(words) >= 4 and words[2] in ("ip", "ip6"):
            if words[3] == TABLE:
                self._change = self._change or (line if len(line) <= 200 else line[:200] + "...")
            elif words[:2] == ["add", "table"] and words[3] == self._marker:
                self._own = True
        return None


def _writer(generation: str) -> str:
    """``by process 4242 (nft)`` from ``# new generation 7 by process 4242 (nft)``."""
    at = generation.find(" by ")
    return generation[at + 1:] if at >= 0 else "by an unknown process"

