#!/usr/bin/env python3
"""New-flow cost: rate of new UDP flows masqueraded by the node, nftables vs iptables, 10 to 10k CIDRs.

Topology (the tests' three network namespaces, :class:`masqd.testing.topology.Topology`, which this
script creates and always deletes, also on SIGTERM or SIGINT; needs root)::

    pod  eth0 10.244.1.2/24 --veth-- vpod 10.244.1.1/24  node  vdst 172.30.0.1/24 --veth-- eth0 172.30.0.2/24  dest
                                                                                    lo 203.0.113.2/32

masqd runs in the node (``masqd run --once --backend X``) with N non-masquerade CIDRs: /28 blocks
32 addresses apart in 10.0.0.0/8, none covering 203.0.113.2, so every new flow to the destination
is masqueraded and the iptables backend's chain is scanned to its last rule, while the nftables
backend does one interval-set lookup.

Sender: S Python processes in the pod (default 1, see --senders), each with a raw socket
(IPPROTO_RAW, header included) writing 36-byte UDP datagrams to 203.0.113.2 whose (source port,
destination port) pair never repeats during the whole run (2048 source ports, split between the
senders, times an ever-increasing destination port): every datagram is a new flow, i.e. a
conntrack miss, a new entry, and one traversal of the nat postrouting hook with masqd's rules.
No socket is created per datagram, so the per-datagram cost is one ``sendto`` plus the kernel's
forwarding path, which on veth runs on the sender's CPU in the same system call.

Counting is done by the kernel, not by a user-space receiver (which could not keep up and would
become the bottleneck on 2 cores): in dest, a prerouting rule counts and drops the datagrams,
separately for source 172.30.0.1 (masqueraded, expected) and anything else (not masqueraded);
in the node, a postrouting filter chain (priority 300, after NAT) counts ``ct state new``
packets, which proves that each delivered datagram created a new conntrack entry (a new flow).
The node's conntrack table is flushed (ctnetlink) before each point (and its UDP timeout lowered to
5 s, so nothing lingers long if a flush fails). nf_conntrack_max is global
(read-only inside a namespace) and is left alone, so a point never creates more entries than
fit: a 0.25 s calibration burst estimates the rate and the point is shortened below ``--seconds``
when needed (reported), and each sender also stops at its share of 90% of the maximum. The node's
conntrack statistics (drop, early_drop, insert_failed) are reported per point: non-zero means
conntrack, not masqd's rules, limited the rate.

Each (backend, size) point is measured ``--repeats`` times (default 5) for up to ``--seconds``
(default 3) seconds; the points are interleaved (round-robin over backends, sizes in alternating
order) so slow drifts of the VM spread over all of them.

    sudo .venv/bin/python benchmarks/flow_rate.py [--sizes 10,1000,10000] [--seconds 3] [--repeats 5]
        [--extra-config FILE]

``--extra-config FILE``: the text of FILE (more config keys, each starting at column 0) is appended
to every config masqd applies (``benchmarks/decision_model.py`` uses it for the decision model's
keys). The keys must leave the pod's flows to 203.0.113.2 through ``vdst`` masqueraded, or the
counters say so (``!! ... NOT masqueraded``). Without it the configs are as described above.

Output: one line per run, then per (backend, size) the delivered flows/s (median, min, max,
spread = (max - min) / median) and the senders' CPU microseconds per flow. The second figure is
the steadier one on a shared VM: other load steals wall time from the senders (the "on CPU"
column shows how much of the wall time they actually ran) but barely changes the CPU each flow
costs. Then the ratios the issue asks for, each with the run-to-run spread to judge it against.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_common import cidr_blocks, ignore_signals, namespaces_usable

from masqd.testing import netns
from masqd.testing import topology as layout

BACKENDS = ("nftables", "iptables")
MASQD = Path(sys.executable).with_name("masqd")
POD, NODE_POD_SIDE, NODE, DEST_LINK = layout.POD_V4, layout.NODE_POD_SIDE_V4, layout.NODE_V4, layout.DEST_LINK_V4
DEST = "203.0.113.2"  # owned by the dest namespace, outside every non-masquerade CIDR of the configs
UDP_TIMEOUT_S = 5
FIRST_PORT = 1024
#: Source ports used per destination port: the flows to one destination port compete for the
#: masquerade's ~64k source ports of (172.30.0.1 -> 203.0.113.2:dport); at 2048 they fill 3% of
#: them, so NAT finds a free port at once (filling all 64k made port selection the bottleneck).
SOURCE_PORTS = 2048


def run(ns: str, *argv: str, **kwargs) -> str:
    """The output of ``argv`` run inside ``ns`` (see :func:`masqd.testing.netns.run`)."""
    return netns.run(ns, *argv, **kwargs).stdout


# --- topology ----------------------------------------------------------------------------------------


class Topology(layout.Topology):
    """The tests' pod -> node -> dest namespaces (:class:`masqd.testing.topology.Topology`), with what
    this benchmark adds: a short UDP conntrack timeout in the node, static neighbours (no ARP
    resolution on the path), and counters of its own (never masqd's tables) in dest and node."""

    def __init__(self) -> None:
        super().__init__()
        try:
            self._instrument()
        except BaseException:
            self.close()
            raise

    def _instrument(self) -> None:
        assert DEST in layout.DEST_V4
        run(self.node, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={UDP_TIMEOUT_S}",
            f"net.netfilter.nf_conntrack_udp_timeout_stream={UDP_TIMEOUT_S}")
        mac = lambda ns, link: json.loads(run(ns, "ip", "-j", "link", "show", link))[0]["address"]  # noqa: E731
        run(self.pod, "ip", "neigh", "replace", NODE_POD_SIDE, "lladdr", mac(self.node, "vpod"), "dev", "eth0")
        run(self.node, "ip", "neigh", "replace", DEST_LINK, "lladdr", mac(self.dest, "eth0"), "dev", "vdst")
        run(self.dest, "nft", "-f", "-", input=f"""
table ip mqbench {{
    counter masqueraded {{ }}
    counter other {{ }}
    chain pre {{
        type filter hook prerouting priority raw; policy accept;
        ip daddr {DEST} meta l4proto udp ip saddr {NODE} counter name "masqueraded" drop
        ip daddr {DEST} meta l4proto udp counter name "other" drop
    }}
}}
""")
        run(self.node, "nft", "-f", "-", input=f"""
table ip mqbench {{
    counter new_flows {{ }}
    chain post {{
        type filter hook postrouting priority 300; policy accept;
        ip daddr {DEST} ct state new counter name "new_flows"
    }}
}}
""")

    def counters(self) -> dict[str, int]:
        out = {}
        for ns, table in ((self.dest, "masqueraded"), (self.dest, "other"), (self.node, "new_flows")):
            text = run(ns, "nft", "list", "counter", "ip", "mqbench", table)
            out[table] = int(re.search(r"packets (\d+)", text).group(1))
        return out

    def conntrack_stats(self) -> dict[str, int]:
        """Sum over CPUs of the node's /proc/net/stat/nf_conntrack columns (hex)."""
        lines = run(self.node, "cat", "/proc/net/stat/nf_conntrack").split("\n")
        names = lines[0].split()
        totals = dict.fromkeys(names, 0)
        for line in lines[1:]:
            for name, value in zip(names, line.split()):
                totals[name] += int(value, 16)
        return totals

    def conntrack_count(self) -> int:
        return int(run(self.node, "cat", "/proc/sys/net/netfilter/nf_conntrack_count").strip())

    def flush_conntrack(self) -> None:
        run(self.node, sys.executable, "-c", _CT_FLUSH)


# ctnetlink IPCTNL_MSG_CT_DELETE without attributes = flush the conntrack table (no conntrack CLI needed)
_CT_FLUSH = r"""
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
msg_type = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
body = struct.pack("BBH", socket.AF_INET, 0, 0)
s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 0x1 | 0x4, 1, 0) + body)  # NLM_F_REQUEST|NLM_F_ACK
reply = s.recv(4096)
error = struct.unpack_from("=i", reply, 16)[0]
if error:
    raise SystemExit(f"conntrack flush failed: {error}")
"""

# One sender: raw socket, (sport, dport) pairs never repeating. argv: dst src sport_lo sport_hi
# dport_first dport_last seconds max_datagrams. Prints "sent elapsed last_dport errors cpu_seconds";
# cpu from /proc/self/schedstat (ns, this thread's time on a CPU; it includes the softirq forwarding
# work run in this thread's context, since this kernel has no IRQ time accounting).
_SENDER = r"""
import socket, struct, sys, time
dst, src = sys.argv[1], sys.argv[2]
sport_lo, sport_hi, dport, dport_last = map(int, sys.argv[3:7])
seconds, limit = float(sys.argv[7]), int(sys.argv[8])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
packet = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36, 0, 0, 64, 17, 0,
                               socket.inet_aton(src), socket.inet_aton(dst))
                   + struct.pack("!HHHH", 0, 0, 16, 0) + b"masqbnch")
pack_into = struct.Struct("!HH").pack_into
send = s.sendto
addr = (dst, 0)
sports = range(sport_lo, sport_hi)
chunks = [sports[i:i + 256] for i in range(0, len(sports), 256)]
sent = errors = 0
sys.stdout.write("ready\n"); sys.stdout.flush()
def cpu():
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0]) / 1e9
sys.stdin.readline()  # go
cpu0 = cpu()
start = time.perf_counter()
deadline = start + seconds
done = False
while dport <= dport_last and not done:
    for chunk in chunks:
        for sport in chunk:
            pack_into(packet, 20, sport, dport)
            try:
                send(packet, addr)
            except OSError:
                errors += 1
        sent += len(chunk)
        if time.perf_counter() >= deadline or sent >= limit:
            done = True
            break
    dport += 1
elapsed = time.perf_counter() - start
print(sent - errors, elapsed, dport, errors, cpu() - cpu0)
"""


def send_flows(topo: Topology, senders: int, seconds: float, limit: int,
               dport_first: int) -> tuple[int, float, int, int, float]:
    """Run the senders in parallel; returns (sent, longest elapsed, next free dport, errors, CPU s)."""
    # every sender gets its own slice of source ports, all share the destination port sequence
    bounds = [FIRST_PORT + SOURCE_PORTS * k // senders for k in range(senders + 1)]
    procs = []
    try:
        for k in range(senders):
            proc = netns.popen(topo.pod, sys.executable, "-c", _SENDER, DEST, POD, str(bounds[k]), str(bounds[k + 1]),
                               str(dport_first), "65535", str(seconds), str(limit // senders),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("sender did not start")
        for proc in procs:  # start them together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        sent = errors = 0
        elapsed = cpu = 0.0
        next_dport = dport_first
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            n, t, last, e, c = out.split()
            sent, elapsed, errors, cpu = sent + int(n), max(elapsed, float(t)), errors + int(e), cpu + float(c)
            next_dport = max(next_dport, int(last) + 1)
        return sent, elapsed, next_dport, errors, cpu
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass
class Run:
    """One measured run of a point: what the senders did and what the kernel counted."""

    seconds: float  # the sending time asked for (shorter than asked when conntrack would fill up)
    sent: int
    elapsed: float
    errors: int
    cpu: float  # the senders' CPU seconds
    got: dict[str, int]  # counter deltas: masqueraded, other (not masqueraded), new_flows
    trouble: dict[str, int]  # non-zero conntrack statistics deltas (drop, early_drop, insert_failed)

    @property
    def rate(self) -> float:
        return self.got["masqueraded"] / self.elapsed


def measure_run(topo: Topology, senders: int, max_seconds: float, limit: int, dport: int) -> tuple[Run, int]:
    """One run with the rules the node holds now: a 0.25 s calibration burst sizes it (the node's
    conntrack table must never fill up: ``limit`` flows at most), then up to ``max_seconds`` of
    new flows, counted by the kernel. Returns the run and the next free destination port."""
    # conntrack_max is global (read-only here), so a point may not create more
    # entries than fit: a 0.25 s calibration burst sizes the point's duration
    topo.flush_conntrack()
    sent, elapsed, dport, _, _ = send_flows(topo, senders, 0.25, limit, dport)
    seconds = min(max_seconds, 0.8 * limit / (sent / elapsed))
    topo.flush_conntrack()
    before, stats0 = topo.counters(), topo.conntrack_stats()
    sent, elapsed, dport, errors, cpu = send_flows(topo, senders, seconds, limit, dport)
    time.sleep(0.2)  # let the last datagrams land
    after, stats1 = topo.counters(), topo.conntrack_stats()
    got = {k: after[k] - before[k] for k in after}
    trouble = {k: stats1[k] - stats0[k] for k in ("drop", "early_drop", "insert_failed")
               if stats1.get(k, 0) - stats0.get(k, 0)}
    return Run(seconds, sent, elapsed, errors, cpu, got, trouble), dport


def rel_spread(values: list[float]) -> float:
    """(max - min) / median, in percent."""
    return (max(values) - min(values)) / statistics.median(values) * 100




def apply_masqd(topo: Topology, backend: str, config: Path) -> None:
    """masqd writes its rules into the node (run --once: no daemon disturbing the measurement)."""
    other = "iptables" if backend == "nftables" else "nftables"
    run(topo.node, str(MASQD), "cleanup", "--backend", other, timeout=120)
    run(topo.node, str(MASQD), "run", "--once", "--backend", backend, "--config", str(config), "--log-format", "json",
        timeout=120)


def nat_rule_count(topo: Topology, backend: str) -> str:
    if backend == "nftables":
        listing = run(topo.node, "nft", "list", "set", "ip", "masqd", "nonmasq4")
        return f"{listing.count('/28')} set elements"
    chain = run(topo.node, "iptables-save", "-t", "nat")
    return f"{sum(1 for line in chain.splitlines() if line.startswith('-A IP-MASQ-AGENT '))} chain rules"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--seconds", type=float, default=3.0, help="sending time per point (default 3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--senders", type=int, default=1,
                        help="parallel sender processes (default 1: the other CPU stays free for the rest "
                             "of the machine, and flows do not contend for conntrack locks across CPUs)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--extra-config", type=Path, metavar="FILE",
                        help="append this file's text (more config keys) to every config masqd applies")
    args = parser.parse_args()
    extra = args.extra_config.read_text() if args.extra_config else ""
    if extra and not extra.endswith("\n"):
        extra += "\n"
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if not namespaces_usable():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    configs = {}
    for n in sizes:
        configs[n] = workdir / f"config-{n}.yaml"
        configs[n].write_text(f"cidrLimit: {n + 10}\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n"
                              + "".join(f"  - {c}\n" for c in cidr_blocks(n)) + extra)
    rates: dict[tuple[str, int], list[float]] = {}
    costs: dict[tuple[str, int], list[float]] = {}  # sender CPU microseconds per flow
    shares: dict[tuple[str, int], list[float]] = {}  # sender CPU time / (wall time x senders)
    notes: list[str] = []
    topo = None
    started = time.perf_counter()
    try:
        topo = Topology()
        print(f"{os.cpu_count()} CPUs, {args.senders} sender(s), up to {args.seconds:g} s per point, "
              f"{args.repeats} repeats, nf_conntrack_max {run(topo.node, 'cat', '/proc/sys/net/netfilter/nf_conntrack_max').strip()} "
              f"(global, left as is)", flush=True)
        conntrack_max = int(run(topo.node, "cat", "/proc/sys/net/netfilter/nf_conntrack_max"))
        limit = int(conntrack_max * 0.9)  # flows per point at most: the table must never fill up
        shortened: list[float] = []
        dport = FIRST_PORT
        for repeat in range(args.repeats):
            for n in (sizes if repeat % 2 == 0 else sizes[::-1]):  # alternate the order
                for backend in backends:
                    apply_masqd(topo, backend, configs[n])
                    if repeat == 0:
                        legacy = run(topo.node, "cat", "/proc/net/ip_tables_names", check=False).split()
                        notes.append(f"{backend} {n}: {nat_rule_count(topo, backend)}"
                                     + (f"; legacy iptables tables in the node: {legacy}" if legacy else ""))
                    measured, dport = measure_run(topo, args.senders, args.seconds, limit, dport)
                    if measured.seconds < args.seconds:
                        shortened.append(measured.seconds)
                    sent, elapsed, errors, cpu = measured.sent, measured.elapsed, measured.errors, measured.cpu
                    got, trouble, rate = measured.got, measured.trouble, measured.rate
                    rates.setdefault((backend, n), []).append(rate)
                    costs.setdefault((backend, n), []).append(cpu / sent * 1e6)
                    shares.setdefault((backend, n), []).append(cpu / (elapsed * args.senders))
                    print(f"  {backend:8s} {n:>6d} CIDRs, run {repeat + 1}: {rate:10,.0f} flows/s, "
                          f"{cpu / sent * 1e6:5.2f} CPU us/flow, senders on CPU {cpu / (elapsed * args.senders):4.0%} "
                          f"of {elapsed:.2f} s  (sent {sent:,}, "
                          f"delivered masqueraded {got['masqueraded']:,}, not masqueraded {got['other']:,}, "
                          f"new conntrack entries {got['new_flows']:,}"
                          + (f", send errors {errors:,}" if errors else "")
                          + (f", conntrack {trouble}" if trouble else "") + ")", flush=True)
                    if got["other"]:
                        notes.append(f"!! {backend} {n}: {got['other']} datagrams reached dest NOT masqueraded")
                    if got["new_flows"] < got["masqueraded"]:
                        notes.append(f"!! {backend} {n}: fewer new conntrack entries ({got['new_flows']}) than "
                                     f"datagrams delivered ({got['masqueraded']}): some were not new flows")
                    if dport > 65535 - 100:
                        raise RuntimeError("destination ports exhausted: fewer repeats or shorter points")
    finally:
        ignore_signals()
        if topo is not None:
            topo.close()
        shutil.rmtree(workdir, ignore_errors=True)

    if shortened:
        notes.append(f"{len(shortened)} point(s) shortened to {min(shortened):.2f}-{max(shortened):.2f} s so that "
                     f"the node's conntrack table (max {conntrack_max}, global) never filled up")
    print()
    for note in notes:
        print(f"  {note}")
    print()
    print(f"new UDP flows delivered masqueraded to dest ({args.repeats} runs of up to {args.seconds:g} s each); "
          f"CPU us/flow = senders' CPU time (incl. the forwarding softirq work in their context) / flows")
    print(f"{'backend':9s} {'CIDRs':>6s} {'flows/s':>10s} {'min':>10s} {'max':>10s} {'spread':>7s} "
          f"{'us/flow':>8s} {'min':>6s} {'max':>6s} {'spread':>7s} {'on CPU':>7s}")
    for key in sorted(rates, key=lambda k: (k[0] != "nftables", k[1])):
        r, c = rates[key], costs[key]
        print(f"{key[0]:9s} {key[1]:>6d} {statistics.median(r):10,.0f} {min(r):10,.0f} {max(r):10,.0f} "
              f"{rel_spread(r):6.1f}% {statistics.median(c):8.2f} {min(c):6.2f} {max(c):6.2f} {rel_spread(c):6.1f}% "
              f"{statistics.median(shares[key]):6.0%}")

    def med(table: dict, backend: str, n: int) -> float | None:
        return statistics.median(table[(backend, n)]) if (backend, n) in table else None

    small, big = min(sizes), max(sizes)
    print()
    for backend in backends:
        lo, hi = med(rates, backend, small), med(rates, backend, big)
        if lo and hi:
            print(f"{backend}: flows/s at {big} CIDRs / at {small} CIDRs = {hi / lo:.3f}; CPU per flow "
                  f"{med(costs, backend, big) / med(costs, backend, small):.3f}x")
    for n in sizes:
        nf, ip = med(rates, "nftables", n), med(rates, "iptables", n)
        if nf and ip:
            print(f"{n} CIDRs: flows/s nftables / iptables = {nf / ip:.2f}x; CPU per flow iptables / nftables = "
                  f"{med(costs, 'iptables', n) / med(costs, 'nftables', n):.2f}x")
    if small != big and ("nftables", small) in rates and ("nftables", big) in rates:
        print(f"issue: the nftables rate must not fall from {small} to {big} CIDRs:")
        for label, table, higher_is_better in (("flows/s", rates, True), ("CPU us/flow", costs, False)):
            lo, hi = table[("nftables", small)], table[("nftables", big)]
            change = statistics.median(hi) / statistics.median(lo) - 1
            noise = max(rel_spread(lo), rel_spread(hi)) / 100
            # separated: every run at the big size is worse than every run at the small one
            separated = (max(hi) < min(lo)) if higher_is_better else (min(hi) > max(lo))
            worse = -change if higher_is_better else change
            if worse <= 0:
                verdict = "does not fall"
            elif separated:
                verdict = (f"FALLS, by {worse:.1%}: every run at {big} is worse than every run at {small} "
                           f"(runs do not overlap)")
            else:
                verdict = f"no fall beyond the noise (the runs at {small} and at {big} overlap)"
            print(f"  {label:12s} {change:+7.1%} from {small} to {big} (run-to-run spread up to {noise:.1%}): {verdict}")
    print(f"(total benchmark time {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
