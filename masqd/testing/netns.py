"""Throw-away network namespaces for kernel-facing tests and benchmarks, and readers of what the
kernel holds inside one; the pod -> node -> destination topology is :mod:`masqd.testing.topology`.

Everything here runs inside namespaces this module creates (``ip netns exec NAME ...``); nothing
touches the root namespace's interfaces or tables. Names are ``mq-<random>-<role>`` so parallel
runs never clash, and :func:`namespace` / :func:`delete_namespace` remove
them again. No pytest here: benchmarks import this module as the tests do.

- namespaces: :func:`netns_available`, :func:`namespace` (a context manager), :func:`create_namespace`,
  :func:`delete_namespace`; commands inside one: :func:`run`, :func:`popen`, :class:`LineReader`,
  :func:`wait_for`, :func:`listening_socket_in`;
- the kernel's state, read with the tools and ``ipaddress``, never with masqd's own parsers:
  :func:`iptables_save`, :func:`chain_lines`, :func:`jumps`, :func:`masqd_lines`, :func:`nft_table`,
  :func:`tables`, :func:`set_intervals`...;
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Seconds any single helper command may take before it is treated as hung.
COMMAND_TIMEOUT = 20


class CommandError(RuntimeError):
    """A helper command failed; the message holds the command, exit code and stderr."""


def unique_name(role: str) -> str:
    """``mq-<6 random hex digits>-<role>``: unique per call, recognisable as a test's."""
    return f"mq-{secrets.token_hex(3)}-{role}"


def run(
    ns: str | None,
    *command: str,
    input: str | bytes | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` inside namespace ``ns`` (``None``: run it as is, e.g. ``ip netns add``).

    Text mode; raises :class:`CommandError` on a non-zero exit when ``check``.
    """
    argv = _argv(ns, command)
    if isinstance(input, bytes):
        input = input.decode()
    result = subprocess.run(argv, input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise CommandError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def popen(ns: str, *command: str, **kwargs) -> subprocess.Popen:
    """Start ``command`` inside namespace ``ns`` in the background (``kwargs``: as for
    ``subprocess.Popen``). ``ip netns exec`` execs the command in place: the child's pid is the
    command's own."""
    return subprocess.Popen(_argv(ns, command), **kwargs)


def _argv(ns: str | None, command: tuple[str, ...]) -> list[str]:
    return list(command) if ns is None else ["ip", "netns", "exec", ns, *command]


def netns_available() -> str | None:
    """``None`` when namespaces can be created here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "iptables-save", "iptables-restore", "ip6tables-save", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout
    if "nf_tables" not in version:
        # the tests read rule handles with `nft` to prove that nothing was rewritten
        return f"the tests need the nf_tables variant of iptables, found: {version.strip()}"
    try:
        subprocess.run(["ip", "netns", "list"], capture_output=True, check=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


def create_namespace(name: str) -> None:
    """Create namespace ``name`` with its loopback up."""
    run(None, "ip", "netns", "add", name)
    run(name, "ip", "link", "set", "lo", "up")


@contextmanager
def namespace(role: str = "solo") -> Iterator[str]:
    """A fresh, empty namespace (loopback up) for the duration of the block; deleted afterwards,
    also when the block (or the creation, half-way) fails."""
    name = unique_name(role)
    try:
        create_namespace(name)
        yield name
    finally:
        delete_namespace(name)


def delete_namespace(name: str) -> None:
    """Delete ``name`` if it exists; never raises (teardown must not mask a test failure)."""
    try:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        pass


def list_namespaces() -> list[str]:
    out = run(None, "ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def iptables_save(ns: str, family: int = 4, table: str | None = "nat", *, binary: str | None = None) -> str:
    """``iptables-save [-t TABLE]`` (``ip6tables-save`` for family 6) inside ``ns``, without the
    ``# Generated by`` / ``# Completed on`` comment lines (they carry a timestamp)."""
    binary = binary or ("iptables-save" if family == 4 else "ip6tables-save")
    command = [binary] + (["-t", table] if table else [])
    text = run(ns, *command).stdout
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


# --- what the kernel holds of masqd's rules ---------------------------------------------------------

#: masqd's (and the upstream agent's) default iptables chain.
CHAIN = "IP-MASQ-AGENT"
#: ``nft`` family name per address family.
NFT_FAMILY = {4: "ip", 6: "ip6"}


def jump_rule(chain: str = CHAIN) -> str:
    """The upstream agent's POSTROUTING jump to ``chain``, as ``iptables-save`` prints it."""
    comment = f"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain"
    return f'-A POSTROUTING -m comment --comment "{comment}" -m addrtype ! --dst-type LOCAL -j {chain}'


def masqd_lines(save_text: str, chain: str = CHAIN) -> list[str]:
    """masqd's lines of an ``iptables-save`` text: its chain declaration, its jump(s), its chain's rules."""
    jump = jump_rule(chain)
    return [line for line in save_text.splitlines()
            if line.startswith(f":{chain} ") or line == jump or line.startswith(f"-A {chain} ")]


def chain_lines(ns: str, chain: str = CHAIN, family: int = 4) -> list[str]:
    """The rules of ``chain`` in the nat table of ``ns``, in order, as ``iptables-save`` prints them."""
    return [line for line in iptables_save(ns, family).splitlines() if line.startswith(f"-A {chain} ")]


def jumps(ns: str, chain: str = CHAIN, family: int = 4) -> int:
    """How many copies of the POSTROUTING jump to ``chain`` the nat table of ``ns`` holds."""
    return iptables_save(ns, family).splitlines().count(jump_rule(chain))


def nft(ns: str, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``nft ARGS`` inside ``ns`` (see :func:`run`)."""
    return run(ns, "nft", *args, input=input, check=check)


def nft_table(ns: str, family: int, name: str = "masqd") -> dict | None:
    """``nft --json list table ip|ip6 NAME`` as parsed JSON; ``None`` when there is no such table."""
    result = nft(ns, "--json", "list", "table", NFT_FAMILY[family], name, check=False)
    if result.returncode != 0:
        if "No such file or directory" not in result.stderr:
            raise CommandError(f"nft --json list table {NFT_FAMILY[family]} {name} in {ns}: {result.stderr.strip()}")
        return None
    return json.loads(result.stdout)


def normalized(doc: dict | None) -> list[dict] | None:
    """An ``nft --json`` listing without what changes on every rewrite (metainfo, handles): equal
    listings mean the same table, object for object, in the same order."""
    if doc is None:
        return None
    out = []
    for obj in doc["nftables"]:
        ((kind, body),) = obj.items()
        if kind != "metainfo":
            out.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return out


def tables(ns: str) -> dict[int, list[dict] | None]:
    """masqd's ``ip`` and ``ip6`` tables in ``ns``, :func:`normalized` (``None``: no such table)."""
    return {family: normalized(nft_table(ns, family)) for family in (4, 6)}


def set_intervals(ns: str, family: int) -> tuple[tuple[int, int], ...] | None:
    """The address ranges in masqd's set, sorted (``None``: no table), read with ``ipaddress``."""
    result = nft(ns, "--json", "list", "set", NFT_FAMILY[family], "masqd", f"nonmasq{family}", check=False)
    if result.returncode != 0:
        if "No such file or directory" not in result.stderr:
            raise CommandError(f"nft --json list set in {ns}: {result.stderr.strip()}")
        return None
    (body,) = [o["set"] for o in json.loads(result.stdout)["nftables"] if "set" in o]
    ranges = []
    for element in body.get("elem", []):
        if isinstance(element, str):
            net = ipaddress.ip_network(element)
        elif "prefix" in element:
            net = ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}")
        else:
            ranges.append(tuple(int(ipaddress.ip_address(a)) for a in element["range"]))
            continue
        ranges.append((int(net.network_address), int(net.broadcast_address)))
    return tuple(sorted(ranges))


class LineReader:
    """Read lines from a pipe with a deadline (so a silent child can never hang a test)."""

    def __init__(self, pipe):
        self._fd = pipe.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buffer = b""
        self._eof = False

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer and not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                return None
            chunk = os.read(self._fd, 4096)
            self._eof = not chunk
            self._buffer += chunk
        if b"\n" not in self._buffer:
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        self._selector.close()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll ``predicate()`` until it returns something true or ``timeout`` passes; returns its last
    value (the synchronous twin of :func:`masqd.testing.wait_until`, for code that is not async:
    it does not fail by itself, the caller asserts on the value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


_LISTEN_CHILD = """
import socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[2], 0))
server.listen(1024)
socket.send_fds(conn, [b"ok"], [server.fileno()])
"""


def listening_socket_in(ns: str, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on ``host`` (a random port) *inside* namespace ``ns``, for a server
    in this process: a socket belongs to the namespace it was created in, so a child started with
    ``ip netns exec`` creates it and passes the descriptor back over a Unix socket. A daemon in
    ``ns`` then reaches this process's server at ``host`` without any route to the root namespace."""
    with tempfile.TemporaryDirectory(prefix="mq-sock-") as directory:
        path = os.path.join(directory, "fd")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            unix.bind(path)
            unix.listen(1)
            unix.settimeout(COMMAND_TIMEOUT)
            child = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _LISTEN_CHILD, path, host])
            try:
                conn, _ = unix.accept()
                with conn:
                    _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
            finally:
                child.wait(timeout=COMMAND_TIMEOUT)
    if not fds:
        raise CommandError(f"no listening socket came back from namespace {ns}")
    return socket.socket(fileno=fds[0])
