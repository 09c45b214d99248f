"""The conntrack table through the ``conntrack`` tool, for a masqd without CAP_NET_ADMIN.

The container image runs masqd as a non-root user and gives the capability to the binaries it
runs (``iptables``, ``nft``, ``conntrack``: the Dockerfile's ``setcap``), so the kernel refuses
masqd's own ctnetlink socket (``EPERM``) while a ``conntrack`` child may read and delete entries.
:class:`~masqd.backends.conntrack.table.ConntrackTable` then falls back to this class. Listing
is one ``conntrack -L`` per family (``-p udp`` in ``udp`` mode); a delete is one ``conntrack -D``
per entry, which the tool carries out by reading the whole table itself (about 0.3 s per delete
at 100k entries, against microseconds over netlink: ``benchmarks/RESULTS.md``), so deletes go in
small batches between which the reconciler's deadline is checked. Processes run through
:func:`masqd.backends.tools.run_tool` (its deadline, kill and reap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from masqd.backends.conntrack.listing import delete_command, parse_listing
from masqd.backends.conntrack.messages import Deleted
from masqd.backends.tools import run_tool
from masqd.errors import kept_output
from masqd.flows import Flow, protocol_name

#: Deletes per call of :meth:`ConntrackTool.delete` (the caller checks its deadline between calls).
BATCH = 8


class ConntrackTool:
    """The ``conntrack`` binary (``binary``: its name or path) as the table's reader and deleter."""

    batch = BATCH

    def __init__(self, binary: str = "conntrack", *, read_only: bool = False):
        self.binary = binary
        self.read_only = read_only

    async def scan(self, family: int, protocol: int | None, each: Callable[[list[Flow]], object]) -> bool:
        """As :meth:`ConntrackTable.scan`, all entries at once. ``OSError`` when the tool fails."""
        command = [self.binary, "-L", "-f", "ipv4" if family == 4 else "ipv6", "-o", "extended"]
        if protocol is not None:
            command += ["-p", protocol_name(protocol)]
        result = await run_tool(command)
        if result.returncode != 0:
            raise OSError(f"{' '.join(command)} exited {result.returncode}: "
                          f"{kept_output(result.stderr.decode(errors='replace'))}")
        flows = parse_listing(result.stdout.decode(errors="replace"), family)
        return not flows or each(flows) is not False

    async def delete(self, flows: Sequence[Flow]) -> Deleted:
        """Delete each of ``flows`` by its original tuple in zone 0; exit status 1 with nothing
        deleted means it had gone already."""
        result = Deleted()
        if self.read_only:
            return result
        for flow in flows:
            done = await run_tool([self.binary, *delete_command(flow)])
            if done.returncode == 0:
                result.deleted.append(flow)
            elif done.returncode == 1 and b"0 flow entries" in done.stderr:
                result.gone += 1
            else:
                result.refused.append((flow, kept_output(done.stderr.decode(errors="replace")) or f"exit {done.returncode}"))
        return result
