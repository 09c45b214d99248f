"""The nftables backend's exec seam: the only part of it that runs ``nft`` (through
:mod:`masqd.backends.tools`), kept apart from the pure model the way kubernetes-sigs/knftables
keeps exec in its own file.

:class:`NftExecutor` is what the backend needs (list, check, apply); :class:`NftMonitor` an
executor that can also follow the kernel's changes. :class:`NftSubprocessExecutor` is the real
one; :class:`masqd.testing.fake_nft.FakeNft` an in-memory one for tests.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import ByteReceiveStream

from masqd.backends.nftables.netlink import Change, element_batch
from masqd.netlink import (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_NETFILTER, SOL_NETLINK, acknowledgements,
                           describe_errno)
from masqd.backends.nftables.render import NFT_FAMILY, TABLE, set_name
from masqd.backends.tools import (TOOL_TIMEOUT_SECONDS, ReadDeadlines, run_tool, script_line, tool_deadline,
                                 tool_output)
from masqd.errors import ApplyError, ElementsRefusedError, ReadBackError, ToolTimeoutError



class NftExecutor(Protocol):
    async def list_table(self, family: int) -> str | None: ...  # JSON text, None: no such table

    async def list_structure(self) -> str: ...  # JSON of every table without set elements (cheap)

    async def apply(self, script: str) -> None: ...  # one all-or-nothing nft -f transaction

    # One transaction making each change (family, intervals to remove, intervals to add) to
    # masqd's set of that family, and nothing else; raises ElementsRefusedError when the kernel
    # refuses any of it (then none of it was made). With no changes it only marks a transaction
    # as masqd's.
    async def change_elements(self, changes: Sequence[Change]) -> None: ...


@runtime_checkable
class NftMonitor(Protocol):
    """An executor that can also follow the kernel's changes (``nft monitor``)."""

    #: the name of the table each ``apply`` adds and deletes again, marking the transaction as masqd's
    write_marker: str

    def monitor(self) -> AbstractAsyncContextManager[ByteReceiveStream]: ...  # nft monitor's output


class NftSubprocessExecutor:
    """Runs the real ``nft`` binary through anyio. A binary that cannot be started raises
    :class:`~masqd.errors.ToolMissingError`."""

    def __init__(self, binary: str = "nft"):
        self.binary = binary
        self.write_marker = f"{TABLE}_write_{os.urandom(6).hex()}"  # (secrets would cost 0.6 MiB of RSS)
        #: Per family, about how many elements masqd's table holds, at most (commas in the last
        #: listing read, or in a script written since): each run's deadline grows with it
        #: (``tool_deadline``, linear); a listing that runs out of time doubles the next one's, as
        #: for iptables (:class:`~masqd.backends.tools.ReadDeadlines`).
        self._reads = ReadDeadlines(square=False)

    async def list_table(self, family: int, name: str = TABLE) -> str | None:
        """``nft --json list table`` of masqd's table (or another table, read only: ``name``)."""
        command = [self.binary, "--json", "list", "table", NFT_FAMILY[family], name]
        if name != TABLE:
            result = await run_tool(command, None)
        else:
            result = await self._reads.read(family, command)
            if result.returncode == 0:
                self._reads.sizes[family] = result.stdout.count(b",")
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            if "No such file or directory" in stderr:  # ENOENT (LC_ALL=C)
                return None
            raise ReadBackError(command, stderr or f"exit {result.returncode}")
        return json_output(command, result.stdout)

    async def list_structure(self) -> str:
        command = [self.binary, "--terse", "--json", "list", "ruleset"]
        result = await run_tool(command, None)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace") or f"exit {result.returncode}")
        return json_output(command, result.stdout)

    async def apply(self, script: str) -> None:
        """Apply ``script`` as one transaction, marked as masqd's by a table added and deleted at
        its end (after the script, so nft's line numbers in errors stay those of ``script``)."""
        await self._load([self.binary, "-f", "-"], script + marker_lines(self.write_marker), script)

    async def change_elements(self, changes: Sequence[Change]) -> None:
        """Change the sets' elements in one nf_tables transaction sent over netlink, without nft:
        nft would first read each whole set back (see :mod:`.netlink`). Marked as masqd's like
        :meth:`apply`. Under the same deadline as a tool run."""
        batch, expected = element_batch(TABLE, {4: set_name(4), 6: set_name(6)}, changes, self.write_marker)
        with anyio.move_on_after(TOOL_TIMEOUT_SECONDS):
            return await _send_batch(batch, expected)
        raise ToolTimeoutError(["nf_tables", "netlink", "batch:", *expected.values()], TOOL_TIMEOUT_SECONDS, wrote=True)

    def monitor(self) -> AbstractAsyncContextManager[ByteReceiveStream]:
        return tool_output([self.binary, "monitor"])

    async def _load(self, command: list[str], text: str, script: str | None = None) -> None:
        """Run ``command`` on ``text``; ``script``: the part of it errors are quoted from."""
        sizes = self._reads.sizes
        elements = text.count(",") + sum(sizes.values())  # an upper bound for either family
        for family in (4, 6):
            sizes[family] = max(sizes.get(family, 0), text.count(","))
        result = await run_tool(command, text.encode(), timeout=tool_deadline(elements, square=False))
        if result.returncode != 0:
            raise load_error(command, result.returncode, result.stderr.decode(errors="replace"), script or text)


#: Characters of output shown when nft's answer is not the JSON document asked for.
SHOWN_OUTPUT = 200


def json_output(command: list[str], stdout: bytes) -> str:
    """``stdout`` of an ``nft --json`` command as text, or :class:`~masqd.errors.ReadBackError`
    naming the command and showing the start of what it printed when that is not one JSON
    document of nft's (an nft that ignores ``--json``, a wrapper script printing a banner, a
    truncated answer): a read-back error, never a parse failure deep in masqd."""
    text = stdout.decode(errors="replace")
    body = text.strip()
    if not (body.startswith('{"nftables"') and body.endswith("}")):
        shown = body[:SHOWN_OUTPUT] + ("..." if len(body) > SHOWN_OUTPUT else "")
        raise ReadBackError(command, f"the output is not nft's JSON: {shown!r}" if body else "no output")
    return text


_SO_SNDBUFFORCE = 32


async def _send_batch(batch: bytes, expected: dict[int, str]) -> None:
    """Send one nf_tables batch and wait for its acknowledgements; raise
    :class:`~masqd.errors.ElementsRefusedError` when any message was refused. nf_tables handles
    the batch inside the send, so the answers are there (or on their way) when it returns."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
    except OSError as exc:  # no netlink here (a sandbox): the caller writes with nft -f instead
        raise ElementsRefusedError("; ".join(expected.values()), describe_errno(exc.errno or 0)) from None
    with sock:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acknowledgements without the (large) batch
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        try:  # root (CAP_NET_ADMIN, which writing nf_tables needs anyway) may go past wmem_max
            sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, len(batch) + 65536)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(batch) + 65536)
        try:
            sock.bind((0, 0))
            sock.sendto(batch, (0, 0))
        except OSError as exc:
            raise ElementsRefusedError("; ".join(expected.values()), describe_errno(exc.errno or 0)) from None
        replies = b""
        while True:
            try:
                replies += sock.recv(1 << 16)
                continue  # read all that is there before looking at it
            except BlockingIOError:
                pass
            acked, failed = acknowledgements(replies)
            # done when every message is answered, or the kernel aborted the batch (a refusal:
            # what it had to say has been read)
            if failed or len(acked) >= len(expected):
                break
            await anyio.wait_readable(sock)
    if failed:
        seq, code, said = failed[0]
        reason = describe_errno(code) + (f": {said}" if said else "")
        raise ElementsRefusedError(expected.get(seq, f"message {seq} of the batch"), reason)


def load_error(command: list[str], returncode: int, stderr: str, script: str) -> ApplyError:
    """The :class:`~masqd.errors.ApplyError` for ``nft -f`` refusing ``script``: its first error
    line, and the script line that error names."""
    return ApplyError(command, returncode, _first_error(stderr), _failed_line(stderr, script))


def _first_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "Error" in line), lines[0] if lines else stderr)


def _failed_line(stderr: str, script: str) -> str | None:
    """nft names errors as ``/dev/stdin:LINE:COL-COL: Error: ...``; return that script line."""
    match = re.search(r":(\d+):\d+(?:-\d+)?: Error", stderr)
    return script_line(script, int(match.group(1))) if match else None


def marker_lines(marker: str) -> str:
    """The lines each apply ends with: a table named ``marker`` added and deleted again, so that
    ``nft monitor`` shows the transaction as masqd's (see :class:`.monitor.ChangeFilter`)."""
    return f"add table ip {marker}\ndelete table ip {marker}\n"
