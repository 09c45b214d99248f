"""masqd's nftables backend against the real kernel, inside throw-away network namespaces.

What the kernel holds after ``masqd run --once --backend nftables`` (compared with the listings
the golden scripts produce, ``tests/golden/nftables/listing_*.json``), that an unchanged kernel
sees no write (watched with ``nft monitor``, which prints every committed transaction), that drift
is healed by the next run and by the daemon's resync, that a killed masqd leaves the old or the
new rule set and never a mix, that nft's refusals reach the user with nft's message and leave
the kernel untouched, and that switching backends or ``masqd cleanup`` removes masqd's rules and
nothing else. The packet tests for both backends live in ``tests/test_netns_iptables.py``.
"""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from masqd_proc import log_events, writes_logged

from masqd.testing import netns
from masqd.testing import topology as layout
from masqd.testing.netns import CHAIN, NFT_FAMILY, nft, nft_table, normalized, set_intervals, tables

pytestmark = pytest.mark.netns

MASQD = Path(sys.executable).parent / "masqd"
GOLDEN = Path(__file__).parent / "golden" / "nftables"

BUILTIN_NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


# --- the golden listings (the kernel itself is read with masqd.testing.netns) ---------------------------


def fixture_listing(name: str) -> list[dict]:
    return normalized(json.loads((GOLDEN / f"listing_{name}.json").read_text()))


def ruleset_with_handles(ns: str) -> str:
    """``nft -a list ruleset``: handles are new whenever something is rewritten."""
    return nft(ns, "-a", "list", "ruleset").stdout


# --- the kernel holds the golden tables; a second run writes nothing -------------------------------

ONLY_10 = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"
IPV6_CONFIG = 'nonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8", 192.168.0.0/16, "2001:db8::/32"]\n'

KERNEL_CASES = [
    pytest.param(None, [], {4: "defaults_ip"}, id="defaults"),
    pytest.param(IPV6_CONFIG, ["--enable-ipv6"], {4: "ipv6_ip", 6: "ipv6_ip6"}, id="ipv4-and-ipv6"),
    pytest.param("masqLinkLocal: true\n", [], {4: "masq_link_local_ip"}, id="masqLinkLocal"),
    pytest.param(ONLY_10, ["--to-ports", "1024-29999,32768-65535"], {4: "to_ports_two_ranges_ip"}, id="to-ports"),
    pytest.param(ONLY_10, ["--to-ports=1024-29999,32768-65535", "--random-fully=false"],
                 {4: "to_ports_two_ranges_no_random_fully_ip"}, id="to-ports-random-fully-false"),
    pytest.param(ONLY_10, ["--to-ports", "8000"], {4: "to_ports_single_port_ip"}, id="to-ports-single-port"),
    pytest.param('nonMasqueradeCIDRs: [0.0.0.0/0, "::/0"]\n', ["--enable-ipv6"],
                 {4: "everything_ip", 6: "everything_ip6"}, id="everything"),
    pytest.param("nonMasqueradeCIDRs: [11.0.0.0/8, 12.0.0.0/8, 192.0.2.1/32, 192.0.2.2/32, 192.0.2.3/32, "
                 "10.1.0.0/16, 10.0.0.0/8]\nmasqLinkLocal: true\n", [], {4: "merged_ip"},
                 id="merged-and-single-addresses"),
    pytest.param('nonMasqueradeCIDRs: ["::ffff:192.0.2.0/120", "::ffff:192.0.3.0/120", "::192.0.2.0/120", '
                 '"2001:db8::1/128"]\nmasqLinkLocalIPv6: true\n', ["--enable-ipv6"], {6: "mapped_ip6"},
                 id="ipv4-mapped-ipv6"),
]


@pytest.mark.parametrize("config, flags, fixtures", KERNEL_CASES)
def test_first_run_writes_the_golden_tables_in_one_transaction_and_a_second_run_writes_nothing(
        node_ns, masqd, monitor, config, flags, fixtures):
    first = masqd.ok(node_ns, *flags, config=config, backend="nftables")
    (transaction,) = monitor.transactions()  # one atomic transaction, every family in it
    families = [4, 6] if "--enable-ipv6" in flags else [4]
    *tables, mark, unmark = [line for line in transaction if line.startswith(("add table ", "delete table "))]
    assert tables == [
        line for f in families
        for line in (f"add table {NFT_FAMILY[f]} masqd", f"delete table {NFT_FAMILY[f]} masqd", f"add table {NFT_FAMILY[f]} masqd")]
    # the transaction ends by marking itself as masqd's (for its own nft monitor), leaving nothing
    assert mark.startswith("add table ip masqd_write_") and unmark == "delete" + mark[len("add"):]
    assert [e["written"] for e in writes_logged(first.stderr)] == [[f"ipv{f}" for f in families]]
    for family, name in fixtures.items():
        assert normalized(nft_table(node_ns, family)) == fixture_listing(name)
    before = ruleset_with_handles(node_ns)

    second = masqd.ok(node_ns, *flags, config=config, backend="nftables")
    third = masqd.ok(node_ns, *flags, config=config, backend="nftables", alias=True)
    assert monitor.transactions() == []
    assert writes_logged(second.stderr) == writes_logged(third.stderr) == []
    assert ruleset_with_handles(node_ns) == before


def test_ipv6_stays_untouched_without_enable_ipv6(node_ns, masqd):
    masqd.ok(node_ns, backend="nftables")
    assert nft_table(node_ns, 6) is None
    assert nft_table(node_ns, 4) is not None


# --- drift ------------------------------------------------------------------------------------------

DRIFT_FLAGS = ["--enable-ipv6"]
DRIFT_CONFIG = 'nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24, "2001:db8:1::/64"]\n'


def _commands(*commands: str):
    def damage(ns: str) -> None:
        for command in commands:
            nft(ns, *command.split())
    return damage


def _replace_masquerade_rule(ns: str) -> None:
    rules = [o["rule"] for o in nft_table(ns, 4)["nftables"] if "rule" in o]
    nft(ns, "replace", "rule", "ip", "masqd", "nat", "handle", str(rules[-1]["handle"]), "masquerade")


DRIFT = [
    pytest.param(4, _commands("delete element ip masqd nonmasq4 { 198.51.100.0/24 }"), id="element-deleted"),
    pytest.param(4, _commands("flush set ip masqd nonmasq4"), id="set-flushed"),
    pytest.param(4, _commands("add element ip masqd nonmasq4 { 192.0.2.0/24 }"), id="element-added"),
    pytest.param(4, _commands("add element ip masqd nonmasq4 { 203.0.113.5-203.0.113.9 }"), id="range-element-added"),
    pytest.param(4, _commands("insert rule ip masqd nat ip saddr 10.244.1.0/24 accept"), id="foreign-rule-inserted"),
    pytest.param(4, _commands("add rule ip masqd nat counter"), id="rule-appended"),
    pytest.param(4, _replace_masquerade_rule, id="masquerade-rule-replaced-without-fully-random"),
    pytest.param(4, _commands("flush chain ip masqd nat"), id="chain-flushed"),
    pytest.param(4, _commands("delete chain ip masqd nat"), id="chain-deleted"),
    pytest.param(4, _commands("chain ip masqd nat { policy drop ; }"), id="chain-policy-drop"),
    pytest.param(4, _commands("delete chain ip masqd nat",
                              "add chain ip masqd nat { type nat hook postrouting priority srcnat - 1 ; }"),
                 id="chain-recreated-at-another-priority"),
    pytest.param(4, _commands("delete table ip masqd"), id="table-deleted"),
    pytest.param(4, _commands("delete table ip masqd", "add table ip masqd"), id="table-emptied"),
    pytest.param(6, _commands("delete element ip6 masqd nonmasq6 { 2001:db8:1::/64 }"), id="ipv6-element-deleted"),
    pytest.param(6, _commands("delete table ip6 masqd"), id="ipv6-table-deleted"),
    pytest.param(4, _commands("add chain ip masqd sneaky { type nat hook postrouting priority srcnat - 1 ; }",
                              "add rule ip masqd sneaky masquerade"),
                 id="extra-base-chain-in-masqds-table"),
    pytest.param(4, _commands("add table ip masqd { flags dormant ; }"),
                 id="table-made-dormant"),
]


@pytest.mark.parametrize("family, damage", DRIFT)
def test_next_run_restores_exactly_the_desired_table(node_ns, masqd, family, damage):
    masqd.ok(node_ns, *DRIFT_FLAGS, config=DRIFT_CONFIG, backend="nftables")
    good = tables(node_ns)
    damage(node_ns)
    assert tables(node_ns) != good, "the damage changed nothing"
    healed = masqd.ok(node_ns, *DRIFT_FLAGS, config=DRIFT_CONFIG, backend="nftables")
    assert tables(node_ns) == good
    assert [e["written"] for e in writes_logged(healed.stderr)] == [[f"ipv{family}"]]  # the other family left alone


@pytest.mark.parametrize("damage", [
    pytest.param(_commands("add chain ip masqd sneaky { type nat hook postrouting priority srcnat - 1 ; }",
                           "add rule ip masqd sneaky masquerade"),
                 id="extra-chain-masquerading-everything"),
    pytest.param(_commands("add table ip masqd { flags dormant ; }"),
                 id="table-made-dormant"),
    pytest.param(_commands("flush set ip masqd nonmasq4"), id="set-flushed"),
])
def test_next_run_restores_the_packet_decisions(topology, masqd, damage):
    """The drift cases that change what happens to packets, observed on packets."""
    expected = {"10.99.0.2": layout.POD_V4, "198.51.100.2": layout.POD_V4, "192.0.2.2": layout.NODE_V4}
    masqd.ok(topology.node, config="nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n", backend="nftables")
    assert {dest: topology.source_seen(dest) for dest in expected} == expected
    damage(topology.node)
    masqd.ok(topology.node, config="nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n", backend="nftables")
    assert {dest: topology.source_seen(dest) for dest in expected} == expected


@pytest.mark.parametrize("config, flags, family, exempt", [
    pytest.param(None, [], 4, True, id="v4-default-169.254-exempt"),
    pytest.param("masqLinkLocal: true\n", [], 4, False, id="v4-masqLinkLocal-true"),
    pytest.param(None, ["--enable-ipv6"], 6, True, id="v6-default-fe80-exempt"),
    pytest.param("masqLinkLocalIPv6: false\n", ["--enable-ipv6"], 6, True, id="v6-masqLinkLocalIPv6-false"),
    pytest.param("masqLinkLocalIPv6: true\n", ["--enable-ipv6"], 6, False, id="v6-masqLinkLocalIPv6-true"),
    pytest.param("masqLinkLocal: true\n", ["--enable-ipv6"], 6, True, id="v6-unaffected-by-masqLinkLocal"),
])
def test_link_local_in_the_kernel_set(node_ns, masqd, config, flags, family, exempt):
    """fe80::/10 is never forwarded by a router, so IPv6 link-local is checked on the set (the
    IPv4 packet test for both backends is in test_netns_iptables.py)."""
    masqd.ok(node_ns, *flags, config=config, backend="nftables")
    net = ipaddress.ip_network("169.254.0.0/16" if family == 4 else "fe80::/10")
    interval = (int(net.network_address), int(net.broadcast_address))
    assert (interval in set_intervals(node_ns, family)) is exempt


# --- the daemon's resync ---------------------------------------------------------------------------


def _is_tick(event: dict) -> bool:
    return event.get("trigger") == "timer" and event.get("event") in ("in sync", "rules restored after outside change")


@pytest.mark.parametrize("family, damage", [
    pytest.param(4, _commands("delete element ip masqd nonmasq4 { 198.51.100.0/24 }"), id="element-deleted"),
    pytest.param(4, _commands("insert rule ip masqd nat ip saddr 10.244.1.0/24 accept"), id="foreign-rule-inserted"),
    pytest.param(6, _commands("delete table ip6 masqd"), id="ipv6-table-deleted"),
])
def test_daemon_resync_restores_the_table(node_ns, daemon, family, damage):
    # the kernel monitor off: the resync alone heals (tests/test_drift.py covers the monitor)
    d = daemon("resyncInterval: 200ms\n" + DRIFT_CONFIG, *DRIFT_FLAGS, "--drift-check-interval=0", backend="nftables")
    good = tables(node_ns)
    damage(node_ns)
    restored = d.next_event(lambda e: e.get("event") == "rules restored after outside change")
    assert restored["trigger"] == "timer"
    assert restored["written"] == [f"ipv{family}"]
    assert tables(node_ns) == good
    assert d.stop() == 0


def test_daemon_resync_on_an_unchanged_kernel_writes_nothing(node_ns, daemon, monitor):
    d = daemon("resyncInterval: 100ms\n" + DRIFT_CONFIG, *DRIFT_FLAGS, backend="nftables")
    monitor.transactions()  # forget the first apply
    before = ruleset_with_handles(node_ns)
    for _ in range(10):  # ten resync ticks, each one reading both tables back
        d.next_event(_is_tick)
    assert monitor.transactions() == []
    assert [e for e in d.events if "written" in e and e.get("trigger") == "timer"] == []
    assert ruleset_with_handles(node_ns) == before
    assert d.stop() == 0


# --- atomicity: a killed masqd leaves the old set or the new one -----------------------------------

ATOMIC_CIDRS = 20_000
ATOMIC_ITERATIONS = 10


def _atomic_config(offset: int, v6: str) -> tuple[str, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """20k /28 blocks 32 addresses apart (none adjacent, so none merge), starting at 10.0.0.0 +
    ``offset``, and one IPv6 /48: the config text and the intervals each family's set must hold."""
    base = int(ipaddress.IPv4Address("10.0.0.0")) + offset
    blocks = [base + 32 * i for i in range(ATOMIC_CIDRS)]
    lines = ["cidrLimit: 30000", "masqLinkLocal: true", "masqLinkLocalIPv6: true", "nonMasqueradeCIDRs:"]
    lines += [f"- {ipaddress.IPv4Address(b)}/28" for b in blocks]
    lines.append(f'- "{v6}"')
    net6 = ipaddress.ip_network(v6)
    return ("\n".join(lines) + "\n", tuple((b, b + 15) for b in blocks),
            ((int(net6.network_address), int(net6.broadcast_address)),))


def _wait_for_namespace_to_empty(ns: str, timeout: float = 20.0) -> None:
    """Wait until no process runs in ``ns``: an nft that a killed masqd had started finishes (or
    fails) on its own, and only then is the kernel state final."""
    if not netns.wait_for(lambda: netns.run(None, "ip", "netns", "pids", ns).stdout.strip() == "", timeout):
        pytest.fail(f"processes still running in {ns}: {netns.run(None, 'ip', 'netns', 'pids', ns).stdout}")


def test_killed_masqd_leaves_the_old_or_the_new_set_never_a_mix(node_ns, tmp_path):
    configs = {"A": _atomic_config(0, "2001:db8:a::/48"), "B": _atomic_config(16, "2001:db8:b::/48")}
    assert not set(configs["A"][1]) & set(configs["B"][1])
    paths = {}
    for name, (text, _, _) in configs.items():
        paths[name] = tmp_path / f"config-{name}"
        paths[name].write_text(text)
    expected = {None: (None, None), **{name: (c[1], c[2]) for name, c in configs.items()}}

    def start(name: str) -> subprocess.Popen:
        return netns.popen(node_ns, str(MASQD), "run", "--once", "--backend", "nftables", "--enable-ipv6",
                           "--config", str(paths[name]), "--log-format", "json",
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def observed():
        state = (set_intervals(node_ns, 4), set_intervals(node_ns, 6))
        for name, value in expected.items():
            if state == value:
                return name
        return state

    # How long one whole run takes here decides the range of kill moments (not an assertion).
    started = time.monotonic()
    calibration = start("A")
    _, stderr = calibration.communicate(timeout=60)
    assert calibration.returncode == 0, stderr
    duration = time.monotonic() - started
    nft(node_ns, "delete", "table", "ip", "masqd")
    nft(node_ns, "delete", "table", "ip6", "masqd")

    rng = random.Random(20261124)
    state = None  # no table yet
    history = []
    for iteration in range(ATOMIC_ITERATIONS):
        target = "AB"[iteration % 2]
        delay = rng.uniform(0.2, 1.1) * duration
        process = start(target)
        try:
            process.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            process.kill()
            killed = True
        finally:
            if process.poll() is None:  # the test itself failed: leave nothing running
                process.kill()
            process.communicate(timeout=60)
        _wait_for_namespace_to_empty(node_ns)
        now = observed()
        history.append((target, round(delay, 3), killed, now if isinstance(now, str | None) else "MIXED"))
        assert now in (state, target), f"after {history[-1]}: not the old ({state}) or new ({target}) set; {history}"
        if state is not None:
            assert now is not None, history
        state = now
    # The chain and rules around the set are whole too: an unkilled run of the config the kernel
    # holds finds nothing to write.
    final = start(state or "A")
    _, stderr = final.communicate(timeout=60)
    assert final.returncode == 0, stderr
    assert observed() == (state or "A")
    if state is not None:
        assert writes_logged(stderr) == [], history


# --- nft refusing a transaction ----------------------------------------------------------------------

_EXECUTOR_IN_NAMESPACE = r"""
import json, sys, anyio
from masqd.backends.nftables import NftSubprocessExecutor
from masqd.errors import ApplyError
script = sys.stdin.read()
executor = NftSubprocessExecutor()
for step in sys.argv[1:]:
    try:
        anyio.run(getattr(executor, step), script)
    except ApplyError as exc:
        print(json.dumps({"step": step, "message": str(exc), "stderr": exc.stderr, "line": exc.line,
                          "returncode": exc.returncode}), flush=True)
    else:
        print(json.dumps({"step": step, "ok": True}), flush=True)
"""

BAD_TRANSACTION = """\
add table ip masqd
delete table ip masqd
table ip masqd {{
\tchain nat {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tfib daddr type local return
{bad}
\t\tmasquerade fully-random
\t}}
}}
"""


@pytest.mark.parametrize("bad, error", [
    pytest.param("\t\tip daddr @nosuchset return", "Error: No such file or directory", id="missing-set"),
    pytest.param("\t\tip daddr 10.0.0.0/33 return", "Error: Prefix length 33 is invalid", id="bad-prefix"),
    pytest.param("\t\tjump nosuchchain", "Error: Could not process rule: No such file or directory",
                 id="missing-chain-refused-by-the-kernel"),
])
def test_refused_transaction_reports_nft_message_and_line_and_changes_nothing(node_ns, masqd, bad, error):
    """There is no separate ``nft --check``: ``nft -f`` itself is all or nothing and names the line."""
    masqd.ok(node_ns, *DRIFT_FLAGS, config=DRIFT_CONFIG, backend="nftables")
    before = ruleset_with_handles(node_ns)
    result = netns.run(node_ns, sys.executable, "-c", _EXECUTOR_IN_NAMESPACE, "apply",
                       input=BAD_TRANSACTION.format(bad=bad))
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["step"] for o in outcomes] == ["apply"]
    for outcome in outcomes:
        assert "ok" not in outcome, outcome
        assert outcome["returncode"] == 1
        assert error in outcome["stderr"]
        assert outcome["stderr"].startswith("/dev/stdin:7:")  # nft's own "file:line:columns: Error: ..."
        assert outcome["line"] == bad
        assert error in outcome["message"] and bad in outcome["message"]
    # neither the delete nor the new table went through: the same objects, the same handles
    assert ruleset_with_handles(node_ns) == before


# --- switching backends and cleanup ----------------------------------------------------------------

SWITCH_CONFIG = 'nonMasqueradeCIDRs: [198.51.100.0/24, "2001:db8:1::/64"]\n'
SWITCH_EXPECTED = {"198.51.100.2": layout.POD_V4, "192.0.2.2": layout.NODE_V4,
                   "2001:db8:1::2": layout.POD_V6, "2001:db8:2::2": layout.NODE_V6}


def _iptables_ours(ns: str, family: int, mode: str) -> list[str]:
    binary = f"{'iptables' if family == 4 else 'ip6tables'}-{mode}-save"
    save = netns.iptables_save(ns, family, binary=binary)
    return [line for line in save.splitlines() if CHAIN in line]


@pytest.mark.parametrize("mode", ["nft", "legacy"])
def test_switching_backends_removes_the_other_backends_rules(topology, masqd, mode):
    ns = topology.node
    flags = ["--enable-ipv6", f"--iptables-mode={mode}"]

    masqd.ok(ns, *flags, config=SWITCH_CONFIG, backend="iptables")
    for family in (4, 6):
        assert len(_iptables_ours(ns, family, mode)) == 5  # chain, jump, link-local, one CIDR, MASQUERADE
    assert {dest: topology.source_seen(dest) for dest in SWITCH_EXPECTED} == SWITCH_EXPECTED

    to_nft = masqd.ok(ns, *flags, config=SWITCH_CONFIG, backend="nftables")
    for family in (4, 6):
        assert _iptables_ours(ns, family, mode) == []
        assert nft_table(ns, family) is not None
    removed = [e for e in log_events(to_nft.stderr) if e.get("backend") == "iptables" and "removed" in e]
    assert removed and all(CHAIN in " ".join(e["removed"]) for e in removed), to_nft.stderr
    assert {dest: topology.source_seen(dest) for dest in SWITCH_EXPECTED} == SWITCH_EXPECTED

    masqd.ok(ns, *flags, config=SWITCH_CONFIG, backend="iptables")
    assert nft_table(ns, 4) is None and nft_table(ns, 6) is None
    assert [line for line in nft(ns, "list", "tables").stdout.splitlines() if "masqd" in line] == []
    for family in (4, 6):
        assert len(_iptables_ours(ns, family, mode)) == 5
    assert {dest: topology.source_seen(dest) for dest in SWITCH_EXPECTED} == SWITCH_EXPECTED


FOREIGN_TABLES = """\
table inet mqforeign {
\tset allowed {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 192.0.2.0/24, 198.51.100.0/24 }
\t}
\tchain forwarded {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip daddr @allowed counter accept
\t}
}
table inet masqd {
\tchain out {
\t\ttype filter hook output priority filter; policy accept;
\t\tcounter
\t}
}
table ip mqnat {
\tchain post {
\t\ttype nat hook postrouting priority srcnat + 10; policy accept;
\t\tip saddr 10.244.9.0/24 masquerade
\t}
}
"""


def test_cleanup_removes_only_masqds_tables(node_ns, masqd, tmp_path):
    nft(node_ns, "-f", "-", input=FOREIGN_TABLES)
    before = ruleset_with_handles(node_ns)
    masqd.ok(node_ns, "--enable-ipv6", config=DRIFT_CONFIG, backend="nftables")
    assert nft_table(node_ns, 4) is not None and nft_table(node_ns, 6) is not None

    def cleanup() -> subprocess.CompletedProcess[str]:
        return netns.run(node_ns, str(MASQD), "cleanup", "--backend", "nftables",
                         "--config", str(tmp_path / "absent"), check=False)

    first = cleanup()
    assert first.returncode == 0, first.stderr
    assert first.stdout == "removed: ip masqd, ip6 masqd\n"
    assert ruleset_with_handles(node_ns) == before  # the foreign tables byte for byte, handles included
    second = cleanup()
    assert second.returncode == 0, second.stderr
    assert second.stdout == "nothing to remove\n"
    assert ruleset_with_handles(node_ns) == before


def test_cleanup_leaves_the_iptables_backends_rules(node_ns, masqd, tmp_path):
    """``cleanup --backend nftables`` is about nft tables: an iptables masqd chain stays."""
    masqd.ok(node_ns, *DRIFT_FLAGS, config=DRIFT_CONFIG, backend="iptables")
    saves = {family: netns.iptables_save(node_ns, family) for family in (4, 6)}
    result = netns.run(node_ns, str(MASQD), "cleanup", "--backend", "nftables", "--config", str(tmp_path / "absent"),
                       check=False)
    assert (result.returncode, result.stdout) == (0, "nothing to remove\n"), result.stderr
    assert {family: netns.iptables_save(node_ns, family) for family in (4, 6)} == saves
    assert all(f"-A {CHAIN} " in save for save in saves.values())


def test_turning_ipv6_off_removes_the_ipv6_table(node_ns, masqd):
    """A family masqd no longer manages must not keep masquerading from an old table."""
    masqd.ok(node_ns, "--enable-ipv6", config=DRIFT_CONFIG.replace(', "2001:db8:1::/64"', ""), backend="nftables")
    assert tables(node_ns)[6] is not None
    off = masqd.ok(node_ns, config=DRIFT_CONFIG.replace(', "2001:db8:1::/64"', ""), backend="nftables")
    assert tables(node_ns)[6] is None and tables(node_ns)[4] is not None
    assert [e["written"] for e in writes_logged(off.stderr)] == [["ipv6"]]
