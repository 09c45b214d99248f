"""masqd plugin: non-masquerade CIDRs and masquerade entries from files, reloaded on change.

Three inputs, each optional, set in masqd's environment:

``MASQD_CIDR_FILES_DIR``
    A directory (a mounted ConfigMap works: its ``..data`` entries are skipped). Every regular
    file in it not starting with ``.`` holds CIDRs, one or more per line, ``#`` starting a comment.
    They keep the pod source address (``nonmasq_cidrs``).
``MASQD_CIDR_FILES_RANGES``
    Comma-separated paths of IP-range JSON documents in the shape cloud providers publish:
    ``{"prefixes": [{"ipv4Prefix": "192.0.2.0/24", ...}, {"ipv6Prefix": "2001:db8::/32", ...}]}``.
    IPv6 prefixes are used only when masqd runs with ``--enable-ipv6``. They keep the pod source
    address too.
``MASQD_CIDR_FILES_MASQUERADE_DIR``
    A directory of files in the same format as ``MASQD_CIDR_FILES_DIR``, holding masquerade
    entries (``masquerade_cidrs``): destinations masqueraded even inside a kept range, by
    longest-prefix match (``169.254.169.254/32`` masquerades the metadata server while the rest of
    ``169.254.0.0/16`` keeps the pod address). A prefix listed here and also kept (by the other
    directory, a ranges document, the config or another plugin) makes masqd refuse the new state,
    naming both.

The files are read when masqd asks (``nonmasq_cidrs``, ``masquerade_cidrs``) and only when they
changed since the last read; the plugin's event source watches them and asks masqd to reconcile
on any change. A file that cannot be read or holds something that is not a CIDR makes the hook
fail with the file and line, so masqd keeps its last good rules. ``masqd explain`` shows the file
and line (or the document and entry) each CIDR came from (``describe_cidrs``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import watchfiles

import masqd
from masqd.cidrs import CIDRError, parse_cidr

__version__ = "0.1.0"

#: The environment variable naming each directory (for messages).
_DIRECTORY_VARIABLES = {"keep": "MASQD_CIDR_FILES_DIR", "masquerade": "MASQD_CIDR_FILES_MASQUERADE_DIR"}


class CidrFiles:
    """The plugin object; ``plugin`` below is the one built from the environment.

    ``directory`` and ``documents`` hold CIDRs that keep the pod address; ``masquerade_directory``
    holds masquerade entries (see the module docstring)."""

    name = "cidr-files"

    def __init__(self, directory: Path | None = None, documents: Sequence[Path] = (),
                 masquerade_directory: Path | None = None):
        self.directory = directory
        self.documents = tuple(documents)
        self.masquerade_directory = masquerade_directory
        # "keep" / "masquerade" -> (file signatures, ipv6, [(cidr, where it was read: "file PATH line N")])
        self._cache: dict[str, tuple[tuple, bool, list[tuple[str, str]]]] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> CidrFiles:
        directory = environ.get("MASQD_CIDR_FILES_DIR") or None
        documents = [Path(p.strip()) for p in environ.get("MASQD_CIDR_FILES_RANGES", "").split(",") if p.strip()]
        masquerade_directory = environ.get("MASQD_CIDR_FILES_MASQUERADE_DIR") or None
        return cls(Path(directory) if directory else None, documents,
                   Path(masquerade_directory) if masquerade_directory else None)

    # --- hooks -------------------------------------------------------------------------------------

    @masqd.hookimpl
    def nonmasq_cidrs(self, options):
        files = self._directory_files("keep", self.directory) + list(self.documents)
        return self._cidrs("keep", files, options.enable_ipv6)

    @masqd.hookimpl
    def masquerade_cidrs(self, options):
        return self._cidrs("masquerade", self._directory_files("masquerade", self.masquerade_directory),
                           options.enable_ipv6)

    @masqd.hookimpl
    def describe_cidrs(self, cidrs):
        """Where each CIDR was read, as of the last ``nonmasq_cidrs`` and ``masquerade_cidrs``
        (for ``masqd explain``)."""
        wanted = set(cidrs)
        found: dict = {}
        for _, _, listed in self._cache.values():
            for cidr, where in listed:
                net = parse_cidr(cidr)
                if net in wanted:
                    found.setdefault(net, []).append(where)
        return found

    @masqd.hookimpl
    def register_sources(self, register):
        if self.directory is not None or self.documents or self.masquerade_directory is not None:
            register(_Watch(self))

    # --- reading -----------------------------------------------------------------------------------

    def _cidrs(self, which: str, files: list[Path], ipv6: bool) -> list[str]:
        """The CIDRs of ``files`` (read again only when one of them changed)."""
        signature = tuple((str(path), _stat_signature(path)) for path in files)
        cached = self._cache.get(which)
        if cached is None or cached[:2] != (signature, ipv6):
            cidrs: list[tuple[str, str]] = []
            for path in files:
                cidrs += self._read(path, ipv6)
            self._cache[which] = cached = (signature, ipv6, cidrs)
        return [cidr for cidr, _ in cached[2]]

    def _directory_files(self, which: str, directory: Path | None) -> list[Path]:
        if directory is None:
            return []
        if not directory.is_dir():
            raise FileNotFoundError(f"{_DIRECTORY_VARIABLES[which]} {directory}: not a directory")
        return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and p.is_file())

    def _read(self, path: Path, ipv6: bool) -> list[tuple[str, str]]:
        text = path.read_text(encoding="utf-8")
        if path in self.documents:
            return _ranges_document(path, text, ipv6)
        cidrs = []
        for number, line in enumerate(text.splitlines(), 1):
            for token in line.split("#", 1)[0].split():
                _check(token, f"{path}:{number}")
                cidrs.append((token, f"file {path} line {number}"))
        return cidrs


def _ranges_document(path: Path, text: str, ipv6: bool) -> list[tuple[str, str]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    prefixes = document.get("prefixes") if isinstance(document, dict) else None
    if not isinstance(prefixes, list):
        raise ValueError(f"{path}: expected a JSON object with a 'prefixes' list")
    cidrs = []
    for index, entry in enumerate(prefixes):
        where = f"{path}: prefixes[{index}]"
        if not isinstance(entry, dict) or not ({"ipv4Prefix", "ipv6Prefix"} & entry.keys()):
            raise ValueError(f"{where}: expected an object with ipv4Prefix or ipv6Prefix")
        for key in ("ipv4Prefix", "ipv6Prefix") if ipv6 else ("ipv4Prefix",):
            if key in entry:
                cidrs.append((_check(entry[key], where), f"{where}.{key}"))
    return cidrs


def _check(value: object, where: str) -> str:
    try:
        parse_cidr(value)
    except CIDRError as exc:
        raise ValueError(f"{where}: {value!r}: {exc.reason}") from None
    return value  # type: ignore[return-value]


def _stat_signature(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _Watch:
    """Asks masqd to reconcile when anything under the watched paths changes. Paths that do not
    exist yet are looked for every second; cancellation stops the watcher thread at once."""

    name = "cidr-files"

    def __init__(self, plugin: CidrFiles):
        self.plugin = plugin

    async def run(self, notify) -> None:
        directories = (self.plugin.directory, self.plugin.masquerade_directory)
        paths = [d for d in directories if d is not None] + [p.parent for p in self.plugin.documents]
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_when_cancelled, stop)
            while not (watched := sorted({str(p) for p in paths if p.exists()})):
                await anyio.sleep(1)
            async for _changes in watchfiles.awatch(*watched, recursive=False, step=10, watch_filter=None,
                                                    stop_event=stop):
                notify("files changed")


async def _set_when_cancelled(event: anyio.Event) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        event.set()


plugin = CidrFiles.from_environment()
