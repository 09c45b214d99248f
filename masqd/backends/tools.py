"""Running the kernel tools (iptables-*, nft): the one place backends start processes."""

from __future__ import annotations

import os
import subprocess

import anyio

from masqd.errors import ReadBackError

#: The tools' messages are parsed ("No such file or directory", "line N failed"): keep them English.
_ENV = {**os.environ, "LC_ALL": "C"}


async def run_tool(command: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` to completion, capturing its output; a missing binary is a ReadBackError."""
    try:
        return await anyio.run_process(command, input=stdin, check=False, env=_ENV)
    except OSError as exc:  # binary missing or not executable
        raise ReadBackError(command, f"cannot run {command[0]}: {exc.strerror or exc}") from None


def script_line(script: str, number: int, limit: int = 200) -> str | None:
    """Line ``number`` (1-based) of an input script, shortened to ``limit`` characters."""
    lines = script.splitlines()
    if not 0 < number <= len(lines):
        return None
    line = lines[number - 1]
    return line if len(line) <= limit else line[:limit] + "..."
