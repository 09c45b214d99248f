"""Crash safety: ``kill -9`` masqd at random moments during applies, on both kernel backends.

After every kill the kernel must hold exactly the old or the new complete rule set, and a
restarted masqd must converge on the config file without duplicating anything.

How (one test per backend, each in a network namespace of its own, nothing in the machine's own):

- Two configs, A and B, of about 2,400 CIDRs each (IPv4 and IPv6, ``--enable-ipv6``), mostly
  different from each other, so that an apply takes tens of milliseconds of kernel-tool time.
  Their exact kernel states are what masqd itself wrote for A alone and for B alone, checked
  CIDR by CIDR against the configs (the jump, the final masquerade, the hooked chain).
- A "zygote" process started in the namespace imports masqd once and forks a child per run that
  calls ``masqd.cli.main(["run", ...])``: the killed process is a real masqd daemon (its own
  event loop, file watch, reconciler, kernel tools), it just skips the interpreter start-up,
  which would otherwise cost most of each cycle. The zygote is a child subreaper, so the kernel
  tools a killed masqd leaves behind become its children, and are waited for and reaped.
- Each cycle starts masqd, waits for its first pass, checks it converged on the file with no
  duplicated rule (and wrote exactly the families the kernel held differently, so nothing when
  it already held that config), then flips the config file between A and B (hard link +
  atomic rename) at random short intervals, so masqd is applying nearly all the time, and
  SIGKILLs it after a random delay; half of these kills are aimed: after the delay, wait until
  masqd runs a writing tool, then a few random milliseconds more. A quarter of the cycles kill
  masqd in its first pass instead (the file differs from the kernel when it starts), and the
  first tenth start from a kernel holding nothing of masqd's (a flushed ruleset, or what
  ``masqd cleanup`` leaves), where "nothing" is the old state.
- The process is frozen (SIGSTOP) for the instant it takes to list its children, so the record
  of which kernel tool was running when it died is exact; then SIGKILL. An orphaned tool finishes
  its transaction (``nft monitor`` dies with masqd); once every one has exited the kernel is
  read: per family (iptables: IPv4 and IPv6 are separate transactions) it must be A's or B's
  state exactly (the nat table as ``iptables-save`` prints it; the table in ``nft list
  ruleset``, with no other table appearing); with nftables both families are one transaction,
  so they must come from the same config.
- The kills that landed while an ``iptables-restore`` / ``nft -f`` was running are counted, and
  a meaningful share must have (otherwise the test would prove nothing).

``MASQD_CRASH_KILLS`` (kills per backend, default 50) runs more; ``MASQD_CRASH_SEED`` replays a
run's random choices (the seed is printed with the numbers: kills by what masqd was running
when it died, how the kernel was left, restarts). Each backend takes about 16 s on a 2-core VM.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from masqd.testing import netns
from masqd.testing.processes import children, cmdline, process_state

KILLS = int(os.environ.get("MASQD_CRASH_KILLS", "50"))
#: The first kills start from a kernel holding none of masqd's rules.
FRESH_KILLS = max(3, KILLS // 10)
#: Share of the other cycles that kill masqd in its first pass (the kernel differs from the file).
STARTUP_SHARE = 0.25
#: Share of kills that must have landed while a kernel tool was writing.
MIN_WRITE_SHARE = 0.2
#: Seconds a flip cycle lets masqd apply before the kill (uniform from 0).
MAX_FLIP_DELAY = 0.25
#: Share of flip cycles whose kill is aimed: after the random delay, wait until masqd runs a
#: kernel tool that writes, then kill after a further random delay of up to AIM_JITTER seconds.
AIMED_SHARE = 0.5
AIM_JITTER = 0.015
#: Seconds between two flips of the config file (uniform).
FLIP_INTERVAL = (0.005, 0.06)

V4_ONLY, V4_SHARED = 2000, 200  # per config: IPv4 CIDRs of its own, and ones A and B share
V6_ONLY, V6_SHARED = 200, 20
FAMILIES = (4, 6)
CHAIN = "IP-MASQ-AGENT"
LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}
TOOL_TIMEOUT = 30.0

pytestmark = pytest.mark.usefixtures("netns_supported")


# --- the two configs ---------------------------------------------------------------------------------


def _config_cidrs(name: str) -> dict[int, list]:
    """A's or B's non-masquerade CIDRs by family: /28 blocks 32 addresses apart (B's 16 further on,
    so A and B share none of them), plus blocks both list; IPv6 /64s two apart. None adjacent, so
    masqd merges none and the kernel must hold each one."""
    offset = {"A": 0, "B": 16}[name]
    base = int(ipaddress.IPv4Address("10.0.0.0")) + offset
    shared = int(ipaddress.IPv4Address("10.128.0.0"))
    v4 = [ipaddress.ip_network(f"{ipaddress.IPv4Address(base + 32 * i)}/28") for i in range(V4_ONLY)]
    v4 += [ipaddress.ip_network(f"{ipaddress.IPv4Address(shared + 32 * i)}/28") for i in range(V4_SHARED)]
    tag = {"A": "a", "B": "b"}[name]
    v6 = [ipaddress.ip_network(f"2001:db8:{tag}:{2 * i:x}::/64") for i in range(V6_ONLY)]
    v6 += [ipaddress.ip_network(f"2001:db8:c:{2 * i:x}::/64") for i in range(V6_SHARED)]
    return {4: v4, 6: v6}


def _config_text(cidrs: dict[int, list]) -> str:
    """JSON (a config may be YAML or JSON; JSON parses fastest, so more of a pass is kernel work)."""
    config = {"cidrLimit": 10000, "resyncInterval": "60s",
              "nonMasqueradeCIDRs": [str(net) for family in FAMILIES for net in cidrs[family]]}
    return json.dumps(config, indent=1) + "\n"


# --- the zygote: masqd imported once, a fork per run --------------------------------------------------

_ZYGOTE = r"""
import ctypes, json, os, signal, sys, time, traceback

PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

# everything `masqd run` may import, so a forked run starts at once
import importlib, pkgutil
import anyio._backends._asyncio
import masqd, masqd.cli
for module in pkgutil.walk_packages(masqd.__path__, "masqd."):
    if module.name.endswith("__main__"):
        continue  # that one runs the command
    try:
        importlib.import_module(module.name)
    except Exception:
        pass  # a module that fails to import fails the same way in the run that needs it

# An edit of the nftables set changes elements in place over netlink: one sendmsg that nf_tables
# applies whole before it returns, so no kill can land inside it. Here A <-> B goes through nft -f
# (as an edit larger than MAX_ELEMENT_CHANGES does), so that kills land in the tool's write.
import masqd.backends.nftables.backend
masqd.backends.nftables.backend.MAX_ELEMENT_CHANGES = 100

masqd_runs = set()   # pids of the runs forked here
exited = {}          # pid -> wait status, of every child reaped

def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def spawn(argv, log):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            code = masqd.cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    masqd_runs.add(pid)
    return pid

def reap(pid, block):
    try:
        got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return False
    if got:
        exited[got] = status
        masqd_runs.discard(got)
    return bool(got)

def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while pid not in exited and time.monotonic() < deadline:
        if not reap(pid, False):
            time.sleep(0.002)
    return exited.get(pid)

def drain(timeout):
    # every child left once the masqd runs are gone: kernel tools a killed masqd left behind
    deadline = time.monotonic() + timeout
    orphans = []
    while True:
        try:
            got, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return orphans, True
        if got:
            exited[got] = status
            if got in masqd_runs:
                masqd_runs.discard(got)
            else:
                orphans.append([got, status])
        elif time.monotonic() >= deadline:
            return orphans, False
        else:
            time.sleep(0.002)

reply({"ready": os.getpid()})
for line in sys.stdin:
    request = json.loads(line)
    op = request["op"]
    if op == "spawn":
        reply({"pid": spawn(request["argv"], request["log"])})
    elif op == "wait":
        reply({"status": wait(request["pid"], request["timeout"])})
    elif op == "drain":
        orphans, done = drain(request["timeout"])
        reply({"orphans": orphans, "done": done})
# the test is over (or failed): leave nothing running, not even a tool that never exits
for pid in list(masqd_runs):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
if not drain(10)[1]:
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as file:
            for pid in file.read().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    drain(10)
"""


class Zygote:
    """The zygote process in namespace ``ns`` and its line-per-request protocol."""

    def __init__(self, ns: str, env: dict[str, str]):
        self.proc = netns.popen(ns, sys.executable, "-c", _ZYGOTE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
        self.lines = netns.LineReader(self.proc.stdout)
        self.live: set[int] = set()
        ready = self._read(60)
        if "ready" not in ready:
            raise RuntimeError(f"zygote did not start: {ready}")

    def _read(self, timeout: float) -> dict:
        line = self.lines.readline(timeout)
        if line is None:
            raise RuntimeError(f"zygote gave no answer within {timeout} s (exit status {self.proc.poll()})")
        return json.loads(line)

    def _ask(self, within: float, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(within + 10)

    def spawn(self, argv: list[str], log: Path) -> int:
        pid = self._ask(10, op="spawn", argv=argv, log=str(log))["pid"]
        self.live.add(pid)
        return pid

    def wait(self, pid: int, timeout: float) -> int | None:
        """The wait status of run ``pid`` (``None``: still running after ``timeout``)."""
        status = self._ask(timeout, op="wait", pid=pid, timeout=timeout)["status"]
        if status is not None:
            self.live.discard(pid)
        return status

    def drain(self, timeout: float = TOOL_TIMEOUT) -> list[tuple[int, int]]:
        """Wait until every tool a killed masqd left behind has exited; their pids and statuses."""
        answer = self._ask(timeout, op="drain", timeout=timeout)
        if not answer["done"]:
            left = [(pid, state, argv, _wchan(pid)) for pid, state, argv in _children(self.proc.pid)]
            pytest.fail(f"kernel tools left by a killed masqd still running after {timeout} s: {left}")
        return [tuple(item) for item in answer["orphans"]]

    def close(self) -> None:
        for pid in self.live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.stdin.close()  # the zygote kills what is left, reaps it and exits
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            self.proc.stdout.close()
            self.lines.close()


@pytest.fixture
def zygote(node_ns):
    z = Zygote(node_ns, {**os.environ, "MASQD_PLUGINS": ""})
    try:
        yield z
    finally:
        z.close()


# --- reading the kernel --------------------------------------------------------------------------------


def _iptables_state(ns: str) -> dict[int, str]:
    """Each family's nat table as ``iptables-save -t nat`` prints it (comment lines dropped)."""
    return {family: netns.iptables_save(ns, family) for family in FAMILIES}


_TABLE_START = re.compile(r"^table (\S+) (\S+) \{$")


def _nft_tables(ns: str) -> dict[tuple[str, str], str]:
    """Every table of ``nft list ruleset``, (family, name) -> its text."""
    text = netns.run(ns, "nft", "list", "ruleset").stdout
    tables: dict[tuple[str, str], str] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None:
            match = _TABLE_START.match(line)
            if match:
                key = (match[1], match[2])
                if key in tables:  # cannot happen, but if it did it would be a duplicate
                    pytest.fail(f"nft lists table {key} twice:\n{text}")
                current = [line]
            elif line.strip():
                pytest.fail(f"unexpected line outside a table in nft list ruleset: {line!r}")
        else:
            current.append(line)
            if line == "}":
                tables[key] = "\n".join(current) + "\n"
                current = None
    return tables


_NFT_NAME = {4: "ip", 6: "ip6"}


def _nft_state(ns: str) -> tuple[dict[int, str | None], tuple]:
    """masqd's table text per family (``None``: absent), and the keys of every other table."""
    tables = _nft_tables(ns)
    ours = {family: tables.pop((_NFT_NAME[family], "masqd"), None) for family in FAMILIES}
    return ours, tuple(sorted(tables))


@dataclass
class IptablesFamily:
    """What a nat table (one family, iptables-save text) holds of masqd's."""

    chains: dict[str, list[str]]
    cidrs: list  # of the RETURN rules in masqd's chain, in order
    jumps: int
    masquerade_last: bool
    strange: list[str]  # rules in masqd's chain that are neither a RETURN nor the final MASQUERADE


def _parse_iptables(text: str) -> IptablesFamily:
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split()[1], []).append(line)
    ours = chains.get(CHAIN, [])
    cidrs, strange = [], []
    for index, rule in enumerate(ours):
        match = re.fullmatch(rf'-A {CHAIN} -d (\S+) -m comment --comment "[^"]*" -j RETURN', rule)
        if match:
            cidrs.append(ipaddress.ip_network(match[1]))
        elif not (index == len(ours) - 1 and re.search(r" -j MASQUERADE( --random-fully)?$", rule)):
            strange.append(rule)
    jumps = sum(1 for rule in chains.get("POSTROUTING", []) if rule.endswith(f"-j {CHAIN}"))
    masquerade_last = bool(ours) and " -j MASQUERADE" in ours[-1]
    return IptablesFamily(chains, cidrs, jumps, masquerade_last, strange)


def _iptables_absent(text: str) -> bool:
    """No trace of masqd: no chain, no rule at all in the nat table."""
    parsed = _parse_iptables(text)
    return CHAIN not in parsed.chains and not any(parsed.chains.values())


def _describe_iptables(text: str, expected: dict[str, set]) -> str:
    """A mixed state, told in numbers: how many of each config's CIDRs, jumps, the last rule."""
    parsed = _parse_iptables(text)
    held = Counter(parsed.cidrs)
    parts = [f"chain {'present' if CHAIN in parsed.chains else 'absent'}", f"{len(parsed.cidrs)} RETURN rules"]
    parts += [f"{len(set(held) & cidrs)} of {name}'s {len(cidrs)}" for name, cidrs in expected.items()]
    parts += [f"{sum(n - 1 for n in held.values())} duplicated", f"{parsed.jumps} POSTROUTING jump(s)",
              f"MASQUERADE last: {parsed.masquerade_last}", f"other rules: {parsed.strange[:3]}"]
    return ", ".join(parts)


def _nft_elements(ns: str, family: int) -> list:
    """The elements of masqd's set of ``family`` (``nft -j``), as networks, with repetitions."""
    data = json.loads(netns.run(ns, "nft", "-j", "list", "set", _NFT_NAME[family], "masqd",
                                f"nonmasq{family}").stdout)
    elements = []
    for obj in data["nftables"]:
        for element in obj.get("set", {}).get("elem", []):
            if isinstance(element, dict) and "prefix" in element:
                elements.append(ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}"))
            else:
                elements.append(("not a prefix", json.dumps(element)))
    return elements


# --- the backends: how to read, check and tell states apart ------------------------------------------------


def _check_iptables_reference(text: str, cidrs: set, family: int) -> None:
    parsed = _parse_iptables(text)
    assert sorted(parsed.cidrs, key=str) == sorted(cidrs, key=str), f"ipv{family}: the chain's CIDRs are not the config's"
    assert parsed.jumps == 1 and parsed.masquerade_last and not parsed.strange, _describe_iptables(text, {"it": cidrs})
    assert set(parsed.chains) == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", CHAIN}, parsed.chains.keys()
    assert len(parsed.chains["POSTROUTING"]) == 1, parsed.chains["POSTROUTING"]


class IptablesKernel:
    name = "iptables"

    def __init__(self, ns: str):
        self.ns = ns

    def read(self):
        return _iptables_state(self.ns)

    def check_reference(self, state, cidrs: dict[int, set]) -> None:
        for family in FAMILIES:
            _check_iptables_reference(state[family], cidrs[family], family)

    def classify(self, state, refs: dict[str, dict]) -> dict[int, str | None]:
        """Per family: the config whose complete state it is, ``"-"`` when masqd has nothing there,
        ``None`` when it is neither (a mix, a duplicate, a missing jump...)."""
        found = {}
        for family in FAMILIES:
            found[family] = next((name for name, ref in refs.items() if state[family] == ref[family]), None)
            if found[family] is None and _iptables_absent(state[family]):
                found[family] = "-"
        return found

    def describe(self, state, cidrs: dict[str, dict[int, set]]) -> str:
        return "; ".join(f"ipv{f}: " + _describe_iptables(state[f], {n: c[f] for n, c in cidrs.items()}) for f in FAMILIES)

    def consistent_families(self) -> bool:
        return False  # two transactions: IPv4 may be new while IPv6 is still old


class NftablesKernel:
    name = "nftables"

    def __init__(self, ns: str):
        self.ns = ns
        self.others: tuple | None = None  # the tables that are not masqd's, as the references saw them

    def read(self):
        return _nft_state(self.ns)

    def check_reference(self, state, cidrs: dict[int, set]) -> None:
        ours, others = state
        for family in FAMILIES:
            elements = _nft_elements(self.ns, family)
            assert len(elements) == len(set(elements)), f"ipv{family}: duplicated set elements"
            assert set(elements) == cidrs[family], f"ipv{family}: the set's elements are not the config's"
            text = ours[family]
            assert text is not None
            assert "type nat hook postrouting priority srcnat + 10; policy accept;" in text, text[-800:]
            rules = text.split("policy accept;", 1)[1].split("}")[0].split("\n")
            rules = [r.strip() for r in rules if r.strip()]
            assert rules[0] == "fib daddr type local return", rules
            assert rules[1] == f"{_NFT_NAME[family]} daddr @nonmasq{family} return", rules
            assert rules[-1].startswith("masquerade") and len(rules) == 3, rules
        if self.others is None:
            self.others = others
        assert others == self.others, f"other tables changed: {others} vs {self.others}"

    def classify(self, state, refs: dict[str, tuple]) -> dict[int, str | None]:
        ours, others = state
        found = {}
        for family in FAMILIES:
            found[family] = next((name for name, ref in refs.items() if ours[family] == ref[0][family]), None)
            if found[family] is None and ours[family] is None:
                found[family] = "-"
            if others != self.others:  # a table masqd should not have created (or removed)
                found[family] = None
        return found

    def describe(self, state, cidrs: dict[str, dict[int, set]]) -> str:
        ours, others = state
        parts = [f"other tables {others} (expected {self.others})"]
        for family in FAMILIES:
            if ours[family] is None:
                parts.append(f"ipv{family}: no table")
                continue
            elements = _nft_elements(self.ns, family)
            held = set(elements)
            counts = [f"{len(held & c[family])} of {n}'s {len(c[family])}" for n, c in cidrs.items()]
            parts.append(f"ipv{family}: {len(elements)} elements ({', '.join(counts)}), "
                         f"{len(elements) - len(held)} duplicated, table tail: {ours[family][-300:]!r}")
        return "; ".join(parts)

    def consistent_families(self) -> bool:
        return True  # both families are one nft transaction


# --- masqd runs, their logs, the config flipper ---------------------------------------------------------


class Log:
    """The JSON log of one masqd run, read as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.events: list[dict] = []

    def _read_more(self) -> None:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "(not JSON)", "text": line.decode(errors="replace")}
            self.events.append(event)

    def wait_for(self, predicate, timeout: float) -> dict | None:
        """The first event read (so far, or within ``timeout``) that satisfies ``predicate``, else ``None``."""
        seen = 0

        def match() -> dict | None:
            nonlocal seen
            self._read_more()
            found = next((event for event in self.events[seen:] if predicate(event)), None)
            seen = len(self.events)
            return found

        return netns.wait_for(match, timeout, interval=0.003)

    def tail(self, n: int = 15) -> str:
        self._read_more()
        return "\n".join(json.dumps(e) for e in self.events[-n:])


_PASS_DONE = {"rules applied", "rules updated", "rules restored after outside change", "in sync", "rules already in place"}


def _first_pass(event: dict) -> bool:
    return event.get("event") in _PASS_DONE or event.get("level") in ("error", "critical")


class ConfigFile:
    """The config file masqd watches, replaced atomically (a hard link of a prepared file renamed
    over it), either on request or by a thread flipping it between A and B."""

    def __init__(self, directory: Path, sources: dict[str, Path]):
        directory.mkdir()
        self.path = directory / "config"
        self.staging = directory.parent / "config.next"  # same file system, outside the watched directory
        self.sources = sources
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flips = 0

    def set(self, name: str) -> None:
        self.staging.unlink(missing_ok=True)
        os.link(self.sources[name], self.staging)
        os.replace(self.staging, self.path)
        self.current = name

    def start_flipping(self, rng: random.Random) -> None:
        self._stop.clear()
        delays = [rng.uniform(*FLIP_INTERVAL) for _ in range(200)]  # drawn here: the seed decides them

        def flip() -> None:
            for delay in delays:
                if self._stop.wait(delay):
                    return
                self.set("B" if self.current == "A" else "A")
                self.flips += 1

        self._thread = threading.Thread(target=flip, name="config-flipper", daemon=True)
        self._thread.start()

    def stop_flipping(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as file:
            return file.read()
    except OSError:
        return "?"


def _children(pid: int) -> list[tuple[int, str, list[str]]]:
    """(pid, state, argv) of each child of ``pid`` (every thread's), zombies included."""
    found = []
    for child in children(pid):
        argv = cmdline(child)
        if argv is not None:  # not exited and reaped meanwhile
            found.append((child, process_state(child) or "?", argv))
    return found


def _tool_kind(argv: list[str]) -> str:
    """What a child of masqd was doing: ``write`` (iptables-restore, nft -f), ``check``
    (nft --check), ``read`` (save, list, --version), ``monitor`` (``nft monitor``, which runs as
    long as masqd does) or ``spawning`` (not yet the tool)."""
    name = os.path.basename(argv[0]) if argv else ""
    if "monitor" in argv:
        return "monitor"
    if "restore" in name:
        return "write"
    if name == "nft":
        return "check" if "--check" in argv else "write" if "-f" in argv else "read"
    if "tables" in name:
        return "read"
    return "spawning"


@dataclass
class Stats:
    kills: int = 0
    at_kill: Counter = field(default_factory=Counter)  # what masqd was running when it died
    orphans: int = 0  # kernel tools that outlived masqd
    outcomes: Counter = field(default_factory=Counter)  # state after the kill vs. before
    convergences: int = 0
    convergence_writes: int = 0
    mixed_families: int = 0  # iptables: IPv4 and IPv6 from different configs after a kill


# --- the test ---------------------------------------------------------------------------------------


class CrashRun:
    """One backend's kill loop (see the module docstring)."""

    def __init__(self, backend: str, ns: str, zygote: Zygote, tmp_path: Path, rng: random.Random):
        self.backend = backend
        self.kernel = IptablesKernel(ns) if backend == "iptables" else NftablesKernel(ns)
        self.zygote = zygote
        self.tmp = tmp_path
        self.rng = rng
        self.cidrs = {}
        sources = {}
        for name in "AB":
            cidrs = _config_cidrs(name)
            self.cidrs[name] = {f: set(cidrs[f]) | {LINK_LOCAL[f]} for f in FAMILIES}
            sources[name] = tmp_path / f"config-{name}.json"
            sources[name].write_text(_config_text(cidrs))
        for f, only in ((4, V4_ONLY), (6, V6_ONLY)):  # A and B share only the shared ones and link-local
            assert self.cidrs["A"][f] & self.cidrs["B"][f] == set(_config_cidrs("A")[f][only:]) | {LINK_LOCAL[f]}
        self.config = ConfigFile(tmp_path / "etc", sources)
        self.refs: dict[str, object] = {}
        self.stats = Stats()
        self.runs = 0
        self.history: list[str] = []
        self.pid: int | None = None
        self.log: Log | None = None
        self.seed: int | None = None
        self.last_kill = ""

    # masqd runs

    def start(self) -> None:
        self.runs += 1
        path = self.tmp / f"masqd-{self.runs}.log"
        if self.runs > 2:
            (self.tmp / f"masqd-{self.runs - 2}.log").unlink(missing_ok=True)  # keep the last two
        argv = ["run", "--backend", self.backend, "--config", str(self.config.path), "--enable-ipv6",
                "--log-format", "json", "--v=4"]
        self.pid = self.zygote.spawn(argv, path)
        self.log = Log(path)

    def first_pass(self, timeout: float = 30) -> dict:
        event = self.log.wait_for(_first_pass, timeout)
        if event is None or event.get("event") not in _PASS_DONE:
            pytest.fail(f"masqd's first pass did not finish well ({event}); log:\n{self.log.tail()}\n{self.trail()}")
        return event

    def wait_for_write(self, timeout: float = 2.0) -> None:
        """Until masqd runs a kernel tool that writes (or ``timeout`` passes)."""
        netns.wait_for(lambda: any(_tool_kind(argv) == "write" for _, state, argv in _children(self.pid) if state != "Z"),
                       timeout, interval=0.0005)

    def kill(self, how: str = "random") -> None:
        """Freeze masqd, note which kernel tools it is running, SIGKILL it, wait for the tools."""
        pid = self.pid
        os.kill(pid, signal.SIGSTOP)
        if not netns.wait_for(lambda: all(process_state(int(t)) in ("T", "t", "Z", None)
                                          for t in os.listdir(f"/proc/{pid}/task")), 5, interval=0.0005):
            pytest.fail(f"masqd {pid} did not stop")
        if process_state(pid) == "Z":
            pytest.fail(f"masqd exited before it was killed; log:\n{self.log.tail()}")
        running = [(child, argv) for child, state, argv in _children(pid)
                   if state != "Z" and _tool_kind(argv) != "monitor"]
        os.kill(pid, signal.SIGKILL)
        status = self.zygote.wait(pid, 10)
        assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"masqd {pid}: wait status {status}; log:\n{self.log.tail()}"
        kinds = sorted({_tool_kind(argv) for _, argv in running})
        self.stats.kills += 1
        self.stats.at_kill[how, "write" if "write" in kinds else kinds[0] if kinds else "none"] += 1
        reaped = {child for child, _ in self.zygote.drain()}  # and the monitor, which dies with masqd
        self.stats.orphans += sum(child in reaped for child, _ in running)
        self.pid = None
        self.last_kill = " ".join(os.path.basename(argv[0]) + ("(--check)" if "--check" in argv else "")
                                  for _, argv in running) or "no tool"

    # kernel states

    def observe(self, allowed: set[str]) -> dict[int, str]:
        """Read the kernel; fail unless each family holds one of ``allowed`` completely
        (``"-"``: nothing of masqd's), from one config for both families with nftables."""
        state = self.kernel.read()
        found = self.kernel.classify(state, self.refs)
        bad = [f for f in FAMILIES if found[f] not in allowed]
        if not bad and self.kernel.consistent_families() and len(set(found.values())) > 1:
            bad = list(FAMILIES)
        if bad:
            pytest.fail(f"after kill {self.stats.kills} ({self.last_kill} running), the kernel holds "
                        f"{found} (None: neither config complete), allowed {sorted(allowed)} per family:\n"
                        f"{self.kernel.describe(state, self.cidrs)}\n{self.trail()}")
        if len(set(found.values())) > 1:
            self.stats.mixed_families += 1
        return found

    def converge(self, held: dict[int, str]) -> None:
        """Start masqd on the file as it is; it must reach the file's config exactly (no duplicate
        rule, one jump / one table per family) and write only the families that differed."""
        want = self.config.current
        self.start()
        event = self.first_pass()
        found = self.observe({want})
        assert set(found.values()) == {want}
        differed = sorted(f"ipv{f}" for f in FAMILIES if held[f] != want)
        written = sorted(event.get("written", []))
        assert written == differed, (f"restarted masqd wrote {written}, the kernel differed from the file in "
                                     f"{differed} ({held} vs {want}); {event}\n{self.trail()}")
        self.stats.convergences += 1
        self.stats.convergence_writes += bool(written)

    def trail(self) -> str:
        return f"seed {self.seed}; last cycles: {self.history[-8:]}"

    # the phases

    def references(self) -> tuple[float, float]:
        """Let masqd apply A, then B, read back each complete state; return how long the first
        apply (from start-up) and a change took."""
        self.config.set("A")
        started = time.monotonic()
        self.start()
        assert self.first_pass()["event"] == "rules applied"
        first = time.monotonic() - started
        state = self.kernel.read()
        self.kernel.check_reference(state, self.cidrs["A"])
        self.refs["A"] = state
        started = time.monotonic()
        self.config.set("B")
        if self.log.wait_for(lambda e: e.get("event") == "rules updated", 30) is None:
            pytest.fail(f"masqd did not apply B; log:\n{self.log.tail()}")
        change = time.monotonic() - started
        state = self.kernel.read()
        self.kernel.check_reference(state, self.cidrs["B"])
        self.refs["B"] = state
        assert self.kernel.classify(state, self.refs) == {4: "B", 6: "B"}
        os.kill(self.pid, signal.SIGTERM)
        assert self.zygote.wait(self.pid, 30) == 0, self.log.tail()
        self.pid = None
        return first, change

    def run(self, kills: int, seed: int) -> Stats:
        self.seed = seed
        first_apply, change = self.references()
        self.timing = (first_apply, change)
        held = {4: "B", 6: "B"}

        for index in range(min(FRESH_KILLS, kills)):  # from a kernel holding nothing of masqd's
            if index % 2:  # what `masqd cleanup` leaves (iptables-nft: an empty nat table)
                cleanup = self.zygote.spawn(["cleanup", "--backend", self.backend], self.tmp / "cleanup.log")
                assert self.zygote.wait(cleanup, 30) == 0, (self.tmp / "cleanup.log").read_text()
            else:  # a namespace as new: no table at all
                netns.run(self.kernel.ns, "nft", "flush", "ruleset")
            assert self.observe({"-"}) == {4: "-", 6: "-"}
            want = self.rng.choice("AB")
            self.config.set(want)
            delay = self.rng.uniform(0, 1.3 * first_apply)
            self.history.append(f"fresh{' (cleanup)' * (index % 2)} {want} kill@{delay:.3f}")
            self.start()
            time.sleep(delay)
            self.kill()
            held = self.observe({"-", want})
            self.history[-1] += f" [{self.last_kill}] -> {held}"
            self.stats.outcomes["-" if "-" in held.values() else "new"] += 1

        for _ in range(kills - min(FRESH_KILLS, kills)):
            if "-" in held.values() or self.rng.random() >= STARTUP_SHARE:
                # a running daemon, converged, then applying flip after flip
                if "-" in held.values():
                    self.config.set(self.config.current)  # whatever the file says
                self.converge(held)
                before = dict.fromkeys(FAMILIES, self.config.current)
                delay = self.rng.uniform(0, MAX_FLIP_DELAY)
                self.history.append(f"flip from {before[4]} kill@{delay:.3f}")
                aimed = self.rng.random() < AIMED_SHARE
                jitter = self.rng.uniform(0, AIM_JITTER)
                self.history[-1] += " aimed" * aimed
                self.config.start_flipping(self.rng)
                time.sleep(delay)
                if aimed:
                    self.wait_for_write()
                    time.sleep(jitter)
                self.kill("aimed" if aimed else "random")
                self.config.stop_flipping()
            else:
                # killed in its first pass: the file asks for the config the kernel does not hold
                before = held
                want = "A" if held[4] == "B" else "B"
                self.config.set(want)
                delay = self.rng.uniform(0, 1.3 * first_apply)
                self.history.append(f"startup {before} -> {want} kill@{delay:.3f}")
                self.start()
                time.sleep(delay)
                self.kill()
            held = self.observe({"A", "B"})
            self.history[-1] += f" [{self.last_kill}] -> {held}"
            self.stats.outcomes["unchanged" if held == before else "changed"] += 1

        self.converge(held)  # the last restart: converges, then stops cleanly
        os.kill(self.pid, signal.SIGTERM)
        assert self.zygote.wait(self.pid, 30) == 0, self.log.tail()
        self.pid = None
        return self.stats


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_kill_9_during_applies_leaves_old_or_new_rules_and_a_restart_converges(backend, node_ns, zygote,
                                                                                tmp_path):
    seed = int(os.environ.get("MASQD_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(f"{seed}-{backend}")
    run = CrashRun(backend, node_ns, zygote, tmp_path, rng)
    started = time.monotonic()
    try:
        stats = run.run(KILLS, seed)
    finally:
        run.config.stop_flipping()
    elapsed = time.monotonic() - started
    writes = sum(n for (_, kind), n in stats.at_kill.items() if kind == "write")
    shares = []
    for how in ("random", "aimed"):
        kinds = {kind: n for (h, kind), n in sorted(stats.at_kill.items()) if h == how}
        shares.append(f"{how} {sum(kinds.values())} ({', '.join(f'{k} {n}' for k, n in kinds.items())})")
    summary = (f"crash safety [{backend}] seed={seed}: {stats.kills} kills in {elapsed:.1f} s "
               f"(first apply {run.timing[0] * 1000:.0f} ms, a change {run.timing[1] * 1000:.0f} ms); "
               f"kills by what masqd was running: {'; '.join(shares)}; {writes / stats.kills:.0%} during a write; "
               f"{stats.orphans} orphaned tools finished; kernel after kill: {dict(stats.outcomes)}"
               + (f", {stats.mixed_families} with IPv4 and IPv6 from different configs" if backend == "iptables" else "")
               + f"; {stats.convergences} restarts converged ({stats.convergence_writes} had to write); "
               f"{run.config.flips} config flips")
    print(summary)  # captured: pytest -rP shows it (the -q dot lines stay intact)
    assert stats.kills == KILLS
    assert writes >= MIN_WRITE_SHARE * stats.kills, f"too few kills landed during a write: {summary}"
    assert stats.orphans >= writes, summary
