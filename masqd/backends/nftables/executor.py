"""The nftables backend's exec seam: the only part of it that runs ``nft`` (through
:mod:`masqd.backends.tools`), kept apart from the pure model the way kubernetes-sigs/knftables
keeps exec in its own file.

:class:`NftExecutor` is what the backend needs (list, check, apply); :class:`NftMonitor` an
executor that can also follow the kernel's changes. :class:`NftSubprocessExecutor` is the real
one; :class:`masqd.testing.fake_nft.FakeNft` an in-memory one for tests.
"""

from __future__ import annotations

import re
import secrets
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from anyio.abc import ByteReceiveStream

from masqd.backends.nftables.render import NFT_FAMILY, TABLE
from masqd.backends.tools import run_tool, script_line, tool_output
from masqd.errors import ApplyError, ReadBackError


class NftExecutor(Protocol):
    async def list_table(self, family: int) -> str | None: ...  # JSON text, None: no such table

    async def list_structure(self) -> str: ...  # JSON of every table without set elements (cheap)

    async def check(self, script: str) -> None: ...

    async def apply(self, script: str) -> None: ...


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
        self.write_marker = f"{TABLE}_write_{secrets.token_hex(6)}"

    async def list_table(self, family: int) -> str | None:
        command = [self.binary, "--json", "list", "table", NFT_FAMILY[family], TABLE]
        result = await run_tool(command, None)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            if "No such file or directory" in stderr:  # ENOENT (LC_ALL=C)
                return None
            raise ReadBackError(command, stderr or f"exit {result.returncode}")
        return result.stdout.decode()

    async def list_structure(self) -> str:
        command = [self.binary, "--terse", "--json", "list", "ruleset"]
        result = await run_tool(command, None)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace") or f"exit {result.returncode}")
        return result.stdout.decode()

    async def check(self, script: str) -> None:
        await self._load([self.binary, "--check", "-f", "-"], script)

    async def apply(self, script: str) -> None:
        """Apply ``script`` as one transaction, marked as masqd's by a table added and deleted at
        its end (after the script, so nft's line numbers in errors stay those of ``script``)."""
        await self._load([self.binary, "-f", "-"], script + marker_lines(self.write_marker), script)

    def monitor(self) -> AbstractAsyncContextManager[ByteReceiveStream]:
        return tool_output([self.binary, "monitor"])

    async def _load(self, command: list[str], text: str, script: str | None = None) -> None:
        """Run ``command`` on ``text``; ``script``: the part of it errors are quoted from."""
        result = await run_tool(command, text.encode())
        if result.returncode != 0:
            raise load_error(command, result.returncode, result.stderr.decode(errors="replace"), script or text)


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
