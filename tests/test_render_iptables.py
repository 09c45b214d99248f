"""The iptables backend: rendered rule texts (golden) and read-back planning (its sync against a
fake kernel: ``tests/test_iptables_sync.py``).

The golden texts in ``tests/golden/iptables/`` were written by hand from the rule text of the
compatibility contract (docs: design.md) and checked against real ``iptables-save`` output
(iptables 1.8.9, nf_tables and legacy): every ``-A`` line is in the canonical form iptables-save
prints, so a read-back compares equal line by line.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest

from masqd.backends.dryrun import DryRunBackend
from masqd.backends.iptables import (
    IptablesBackend,
    NatState,
    format_probability,
    jump_rule,
    parse_nat_state,
    plan_restore,
    render_restore,
)
from masqd.config import AgentOptions, parse_config, parse_to_ports
from masqd.ruleset import Masquerade, compute_ruleset

GOLDEN = Path(__file__).parent / "golden" / "iptables"

NONMASQ = '-m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN'
MASQ = '-m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)"'
JUMP = (
    '-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL '
    'destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT'
)
ONLY_10 = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"


def golden(name: str) -> str:
    return (GOLDEN / f"{name}.txt").read_text()


def ruleset_for(config_text: str | None, options: AgentOptions):
    return compute_ruleset(parse_config(config_text, options).config, options)


def render(config_text: str | None, options: AgentOptions, *, random_fully_supported: bool = True) -> str:
    backend = IptablesBackend(random_fully_supported=random_fully_supported)
    return backend.render(ruleset_for(config_text, options))


# --- golden renders -------------------------------------------------------------------------------

GOLDEN_CASES = [
    pytest.param("defaults", None, AgentOptions(), True, id="defaults"),
    pytest.param("nomasq_all_reserved_ranges", None, AgentOptions(nomasq_all_reserved_ranges=True), True,
                 id="nomasq-all-reserved-ranges"),
    pytest.param("ipv6", 'nonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8", 192.168.0.0/16, "2001:db8::/32"]\n',
                 AgentOptions(enable_ipv6=True), True, id="ipv6-enabled-with-v6-cidrs"),
    pytest.param("masq_link_local", "masqLinkLocal: true\n", AgentOptions(), True, id="masqLinkLocal"),
    pytest.param("masq_link_local_ipv6", 'masqLinkLocalIPv6: true\nnonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8"]\n',
                 AgentOptions(enable_ipv6=True), True, id="masqLinkLocalIPv6"),
    pytest.param("custom_chain", None, AgentOptions(masq_chain="MASQD-EGRESS"), True, id="custom-chain"),
    pytest.param("random_fully_false", None, AgentOptions(random_fully=False), True, id="random-fully-false"),
    pytest.param("random_fully_false", None, AgentOptions(), False, id="random-fully-unsupported-by-binary"),
    pytest.param("to_ports_one_range", ONLY_10, AgentOptions(to_ports=parse_to_ports("32768-65535")), True,
                 id="to-ports-one-range"),
    pytest.param("to_ports_two_ranges", ONLY_10, AgentOptions(to_ports=parse_to_ports("1024-29999,32768-65535")),
                 True, id="to-ports-two-unequal-ranges"),
    pytest.param("to_ports_two_ranges_no_random_fully", ONLY_10,
                 AgentOptions(to_ports=parse_to_ports("1024-29999,32768-65535")), False,
                 id="to-ports-two-ranges-random-fully-unsupported"),
    pytest.param("to_ports_three_ranges", ONLY_10,
                 AgentOptions(to_ports=parse_to_ports("1000-1999,3000-3499,5000-5249")), True,
                 id="to-ports-three-ranges"),
    pytest.param("to_ports_single_port", ONLY_10, AgentOptions(to_ports=parse_to_ports("8000")), True,
                 id="to-ports-single-port"),
]


@pytest.mark.parametrize(("name", "config_text", "options", "random_fully_supported"), GOLDEN_CASES)
def test_render_matches_golden(name, config_text, options, random_fully_supported):
    assert render(config_text, options, random_fully_supported=random_fully_supported) == golden(name)


def test_design_example_rules_are_rendered_verbatim():
    # The rule text of the compatibility contract, for nonMasqueradeCIDRs: [10.0.0.0/8].
    expected = {
        JUMP,
        f"-A IP-MASQ-AGENT -d 169.254.0.0/16 {NONMASQ}",
        f"-A IP-MASQ-AGENT -d 10.0.0.0/8 {NONMASQ}",
        f"-A IP-MASQ-AGENT {MASQ} -j MASQUERADE --random-fully",
    }
    lines = render(ONLY_10, AgentOptions()).splitlines()
    assert {line for line in lines if line.startswith("-A ")} == expected
    assert ":IP-MASQ-AGENT - [0:0]" in lines


def test_ipv4_render_never_contains_ipv6_rules_when_ipv6_is_disabled():
    text = render(None, AgentOptions())
    assert "ip6tables" not in text
    assert "fe80::/10" not in text
    assert text.count("*nat") == 1


def test_masquerade_rule_is_last_in_chain_after_port_rules():
    text = render(ONLY_10, AgentOptions(to_ports=parse_to_ports("1024-29999,32768-65535")))
    chain = [line for line in text.splitlines() if line.startswith("-A IP-MASQ-AGENT ")]
    assert chain[-1] == f"-A IP-MASQ-AGENT {MASQ} -j MASQUERADE --random-fully"
    assert all("-j RETURN" in line for line in chain[:2])
    assert all("--to-ports" in line for line in chain[2:-1])


# --- --to-ports: probability split ----------------------------------------------------------------

_PORT_RULE = re.compile(
    r"-A IP-MASQ-AGENT -p (?P<proto>\w+) " + re.escape(MASQ)
    + r"(?: -m statistic --mode random --probability (?P<p>[0-9.]+))? -j MASQUERADE --to-ports (?P<ports>[0-9-]+)"
)


def _kernel_probability(p: Fraction) -> str:
    # the statistic match stores round(p * 2**31) and iptables-save prints it with %.11f
    return f"{round(p * 2**31) / 2**31:.11f}"


def _size(ports: str) -> int:
    first, _, last = ports.partition("-")
    return int(last or first) - int(first) + 1


@pytest.mark.parametrize(
    "to_ports",
    [
        pytest.param("32768-65535", id="one-range"),
        pytest.param("1024-29999,32768-65535", id="two-unequal-ranges"),
        pytest.param("1000-1999,3000-3499,5000-5249", id="three-ranges"),
        pytest.param("32768-65535,1024-29999", id="two-ranges-given-high-first"),
        pytest.param("8000", id="single-port"),
        pytest.param("8000,9000-9001,10000-10003,20000-20007", id="four-ranges"),
    ],
)
def test_port_rules_split_connections_evenly(to_ports):
    text = render(ONLY_10, AgentOptions(to_ports=parse_to_ports(to_ports)))
    rules = [m.groupdict() for m in map(_PORT_RULE.match, text.splitlines()) if m]
    given = to_ports.split(",")
    # tcp, udp, sctp in that order, each with every interval in the order given
    assert [r["proto"] for r in rules] == [p for p in ("tcp", "udp", "sctp") for _ in given]
    sizes = [_size(ports) for ports in given]
    for proto in ("tcp", "udp", "sctp"):
        mine = [r for r in rules if r["proto"] == proto]
        assert [r["ports"] for r in mine] == given
        for index, rule in enumerate(mine):
            if index == len(mine) - 1:
                assert rule["p"] is None  # the last interval takes what is left
            else:
                assert rule["p"] == _kernel_probability(Fraction(sizes[index], sum(sizes[index:])))


@pytest.mark.parametrize(
    ("probability", "printed"),
    [
        pytest.param(Fraction(1, 2), "0.50000000000", id="half"),
        pytest.param(Fraction(1, 3), "0.33333333349", id="third"),
        pytest.param(Fraction(2, 3), "0.66666666651", id="two-thirds"),
        pytest.param(Fraction(4, 7), "0.57142857136", id="four-sevenths"),
        pytest.param(Fraction(1, 10), "0.10000000009", id="tenth"),
        pytest.param(Fraction(28976, 61744), "0.46929256292", id="1024-29999-of-both-ranges"),
    ],
)
def test_format_probability_prints_what_iptables_save_shows(probability, printed):
    # values read back from `iptables-save` after adding `--probability <p>` with iptables 1.8.9
    assert format_probability(probability) == printed


@pytest.mark.parametrize(
    "to_ports",
    [
        pytest.param("1024-29999,32768-65535", id="two"),
        pytest.param("1000-1999,3000-3499,5000-5249", id="three"),
        pytest.param("1,2-3,4-7,8-15,16-31", id="five-doubling"),
    ],
)
def test_each_port_gets_the_same_share_of_connections(to_ports):
    ranges = parse_to_ports(to_ports)
    total = sum(r.size for r in ranges)
    left = Fraction(1)
    for share in Masquerade(to_ports=ranges).port_shares():
        taken = left if share.probability is None else left * share.probability
        assert taken == Fraction(share.ports.size, total)
        left -= taken
    assert left == 0


# --- read-back and planning -----------------------------------------------------------------------

DESIRED_DEFAULT = tuple(
    line for line in golden("defaults").splitlines() if line.startswith("-A IP-MASQ-AGENT ")
)

# Captured from `iptables-save` (iptables 1.8.9, nf_tables) after masqd applied the defaults, with
# another agent's IP-MASQ-AGENT2 chain and a filter-table chain of the same name next to it.
SAVE_IN_SYNC = f"""\
# Generated by iptables-save v1.8.9 (nf_tables) on Tue Nov 24 21:45:16 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:IP-MASQ-AGENT - [0:0]
-A IP-MASQ-AGENT -d 10.0.0.0/8 -j RETURN
COMMIT
# Completed on Tue Nov 24 21:45:16 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Tue Nov 24 21:45:16 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:IP-MASQ-AGENT - [0:0]
:IP-MASQ-AGENT2 - [0:0]
{JUMP}
-A POSTROUTING -j IP-MASQ-AGENT2
-A IP-MASQ-AGENT -d 169.254.0.0/16 {NONMASQ}
-A IP-MASQ-AGENT -d 10.0.0.0/8 {NONMASQ}
-A IP-MASQ-AGENT -d 172.16.0.0/12 {NONMASQ}
-A IP-MASQ-AGENT -d 192.168.0.0/16 {NONMASQ}
-A IP-MASQ-AGENT {MASQ} -j MASQUERADE --random-fully
-A IP-MASQ-AGENT2 -d 10.0.0.0/8 -j RETURN
COMMIT
# Completed on Tue Nov 24 21:45:16 2026
"""

EMPTY_NAT = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""


def _without(text: str, line: str) -> str:
    lines = text.splitlines(keepends=True)
    lines.remove(line + "\n")
    return "".join(lines)


def _with_jumps(text: str, count: int) -> str:
    lines = [line for line in text.splitlines() if line != JUMP]
    at = lines.index(":IP-MASQ-AGENT2 - [0:0]") + 1
    return "\n".join(lines[:at] + [JUMP] * count + lines[at:]) + "\n"


def test_parse_nat_state_reads_chain_rules_and_jump():
    state = parse_nat_state(SAVE_IN_SYNC, "IP-MASQ-AGENT")
    assert state == NatState(chain_exists=True, rules=DESIRED_DEFAULT, jumps=1, jump_first=True)


def test_in_sync_state_plans_no_write():
    text, reason = plan_restore(DESIRED_DEFAULT, parse_nat_state(SAVE_IN_SYNC, "IP-MASQ-AGENT"), "IP-MASQ-AGENT")
    assert text is None
    assert reason == "in sync"


def test_missing_chain_writes_chain_and_jump():
    text, reason = plan_restore(DESIRED_DEFAULT, parse_nat_state(EMPTY_NAT, "IP-MASQ-AGENT"), "IP-MASQ-AGENT")
    assert text == golden("defaults").removeprefix("# iptables-restore --noflush\n")
    assert "IP-MASQ-AGENT missing" in reason


def test_differing_chain_is_rewritten_without_touching_the_jump():
    decayed = _without(SAVE_IN_SYNC, f"-A IP-MASQ-AGENT -d 172.16.0.0/12 {NONMASQ}")
    text, reason = plan_restore(DESIRED_DEFAULT, parse_nat_state(decayed, "IP-MASQ-AGENT"), "IP-MASQ-AGENT")
    assert text == "\n".join(["*nat", ":IP-MASQ-AGENT - [0:0]", *DESIRED_DEFAULT, "COMMIT"]) + "\n"
    assert "differs" in reason


def test_extra_rule_in_chain_is_removed_by_the_rewrite():
    tampered = SAVE_IN_SYNC.replace(
        f"-A IP-MASQ-AGENT {MASQ}", f"-A IP-MASQ-AGENT -d 8.8.8.0/24 {NONMASQ}\n-A IP-MASQ-AGENT {MASQ}"
    )
    text, _ = plan_restore(DESIRED_DEFAULT, parse_nat_state(tampered, "IP-MASQ-AGENT"), "IP-MASQ-AGENT")
    assert text is not None
    assert "8.8.8.0/24" not in text
    assert ":IP-MASQ-AGENT - [0:0]" in text.splitlines()  # the flush line that drops the stray rule


def test_missing_jump_is_appended_once():
    text, reason = plan_restore(DESIRED_DEFAULT, parse_nat_state(_with_jumps(SAVE_IN_SYNC, 0), "IP-MASQ-AGENT"),
                        "IP-MASQ-AGENT")
    assert text is not None
    lines = text.splitlines()
    assert lines.count(JUMP) == 1
    assert not [line for line in lines if line.startswith("-D ")]
    assert "jump count 0" in reason


@pytest.mark.parametrize("count", [pytest.param(2, id="two"), pytest.param(3, id="three"), pytest.param(5, id="five")])
def test_duplicated_jumps_are_deleted_down_to_one(count):
    state = parse_nat_state(_with_jumps(SAVE_IN_SYNC, count), "IP-MASQ-AGENT")
    assert state.jumps == count
    text, reason = plan_restore(DESIRED_DEFAULT, state, "IP-MASQ-AGENT")
    assert text is not None
    lines = text.splitlines()
    assert lines.count("-D" + JUMP[2:]) == count - 1
    assert JUMP not in lines  # nothing appended
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert f"jump count {count}" in reason


def test_restore_text_for_duplicated_jumps_exactly():
    expected = "\n".join(["*nat", ":IP-MASQ-AGENT - [0:0]", *DESIRED_DEFAULT, "-D" + JUMP[2:], "-D" + JUMP[2:], "COMMIT"]) + "\n"
    assert render_restore(DESIRED_DEFAULT, "IP-MASQ-AGENT", jumps_present=3) == expected


def test_chain_whose_name_is_a_prefix_of_another_is_not_confused():
    only_other = "\n".join([
        "*nat",
        ":POSTROUTING ACCEPT [0:0]",
        ":IP-MASQ-AGENT2 - [0:0]",
        "-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL "
        "destination traffic to our custom IP-MASQ-AGENT2 chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT2",
        f"-A IP-MASQ-AGENT2 -d 10.0.0.0/8 {NONMASQ}",
        f"-A IP-MASQ-AGENT2 {MASQ} -j MASQUERADE --random-fully",
        "COMMIT",
    ]) + "\n"
    assert parse_nat_state(only_other, "IP-MASQ-AGENT") == NatState(chain_exists=False, rules=(), jumps=0)
    other = parse_nat_state(only_other, "IP-MASQ-AGENT2")
    assert other.chain_exists and other.jumps == 1 and len(other.rules) == 2
    # and the other way round: IP-MASQ-AGENT2's rules do not count as ours
    assert parse_nat_state(SAVE_IN_SYNC, "IP-MASQ-AGENT").rules == DESIRED_DEFAULT


def test_chain_in_another_table_is_ignored():
    filter_only = "\n".join([
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":IP-MASQ-AGENT - [0:0]",
        f"-A IP-MASQ-AGENT -d 10.0.0.0/8 {NONMASQ}",
        JUMP,
        "COMMIT",
    ]) + "\n"
    assert parse_nat_state(filter_only, "IP-MASQ-AGENT") == NatState(chain_exists=False, rules=(), jumps=0)
    # a filter table after the nat table does not leak into it either
    assert parse_nat_state(SAVE_IN_SYNC + filter_only, "IP-MASQ-AGENT") == parse_nat_state(SAVE_IN_SYNC, "IP-MASQ-AGENT")


def test_render_restore_declares_only_its_own_chain():
    text = render_restore(DESIRED_DEFAULT, "IP-MASQ-AGENT", jumps_present=0)
    declarations = [line for line in text.splitlines() if line.startswith((":", "*"))]
    assert declarations == ["*nat", ":IP-MASQ-AGENT - [0:0]"]  # no built-in chain is flushed


def test_jump_rule_names_the_chain_in_comment_and_target():
    assert jump_rule("IP-MASQ-AGENT") == JUMP


# --- dry run --------------------------------------------------------------------------------------


async def test_dry_run_first_sync_changes_and_keeps_the_iptables_render():
    backend = DryRunBackend()
    ruleset = ruleset_for(None, AgentOptions(enable_ipv6=True))
    result = await backend.sync(ruleset)
    assert result.changed
    assert result.written == ("ipv4", "ipv6")
    assert backend.last_rendered == IptablesBackend(random_fully_supported=True).render(ruleset)


async def test_dry_run_identical_second_sync_writes_nothing():
    backend = DryRunBackend()
    ruleset = ruleset_for(None, AgentOptions())
    await backend.sync(ruleset)
    assert backend.last_rendered == golden("defaults")
    second = await backend.sync(ruleset_for(None, AgentOptions()))  # equal, not the same object
    assert not second.changed
    assert backend.writes == 1
    assert backend.last_rendered == golden("defaults")


async def test_dry_run_writes_again_when_the_rules_change():
    backend = DryRunBackend()
    await backend.sync(ruleset_for(None, AgentOptions()))
    result = await backend.sync(ruleset_for("masqLinkLocal: true\n", AgentOptions()))
    assert result.changed
    assert backend.last_rendered == golden("masq_link_local")


@pytest.mark.parametrize(
    ("cidr", "expected"),
    [
        pytest.param("10.0.0.0/8", "-d 10.0.0.0/8 ", id="v4"),
        pytest.param("0.0.0.0/0", "", id="v4-everything-has-no-match"),
        pytest.param("::/0", "", id="v6-everything-has-no-match"),
        pytest.param("2001:db8::/32", "-d 2001:db8::/32 ", id="v6"),
        pytest.param("::ffff:192.0.2.0/120", "-d ::ffff:192.0.2.0/120 ", id="v4-mapped-dotted"),
        pytest.param("::192.0.2.0/120", "-d ::192.0.2.0/120 ", id="v4-compatible-dotted"),
        pytest.param("::0.0.1.0/120", "-d ::100/120 ", id="low-bits-stay-hex"),
        pytest.param("1::ffff:c000:200/120", "-d 1::ffff:c000:200/120 ", id="ffff-elsewhere-stays-hex"),
    ],
)
def test_destination_match_is_iptables_save_canonical(cidr, expected):
    """Read-back compares text, so the rendered match must be what ip(6)tables-save prints."""
    from masqd.backends.iptables import destination_match
    from masqd.cidrs import parse_cidr

    assert destination_match(parse_cidr(cidr)) == expected
