"""Shadowing (issue 17, part 3): rules masqd does not write that may masquerade traffic masqd
keeps (a CNI bridge plugin's MASQUERADE, ``OPENSHIFT-MASQUERADE``, another nft table) are found on
every pass and drift check, counted in ``masqd_shadowing_rules{family}``, warned about once per
rule and named by ``/readyz`` (still 200); kube-proxy's masquerade of the traffic it marked is not
shadowing, and ``explain`` says what the mark means.

The classification is pure and tested on rule shapes; the kernel tests run ``masqd run`` in a
namespace next to CNI-, OpenShift- and kube-proxy-shaped rules (:mod:`masqd.testing.kube_proxy`)
on both backends, and send real packets to show the rule does masquerade kept traffic."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import structlog

from masqd.agent import build_agent
from masqd.backends import iptables as ipt
from masqd.backends.base import AFTER, BEFORE, EITHER, INSIDE, KEEPS, MASQUERADES, ForeignRule, LiveFamily, LiveRules
from masqd.backends.dryrun import DryRunBackend
from masqd.backends.nftables.live import other_nat_chains
from masqd.config import AgentOptions, merge_configs, parse_config
from masqd.events import Event
from masqd.explain import explain, format_text
from masqd.http import DEFAULT_ADDRESS, Address
from masqd.provenance import cidr_origins
from masqd.reconcile import Reconciler
from masqd.ruleset import compute_ruleset
from masqd.shadowing import (KUBE_PROXY_MARK, SUMMARY_RULES, Reported, Shadowing, family_shadowing, find_shadowing,
                             mark_meaning, summary)
from masqd.status import AgentStatus
from masqd.testing import kube_proxy, netns
from masqd.testing.netns import CHAIN
from masqd.testing.topology import NODE_V4, POD_V4

DEFAULT_KEPT = tuple(map(ipaddress.ip_network, ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")))
KUBE_PROXY_MEANING = ("traffic kube-proxy marked (0x4000: e.g. hairpin and external traffic to a Service) is "
                      "masqueraded by kube-proxy, not by masqd")


def net(text: str):
    return ipaddress.ip_network(text)


def rule(stage: str = BEFORE, effect: str = MASQUERADES, destination: str | None = None, **fields) -> ForeignRule:
    return ForeignRule(fields.pop("text", "RULE"), stage, effect, None if destination is None else net(destination),
                       **fields)


def kept_by(found: tuple[Shadowing, ...]) -> list[list[str]]:
    return [[str(n) for n in item.kept] for item in found]


# --- which rules shadow masqd (pure) ---------------------------------------------------------------------

ALL = [str(n) for n in DEFAULT_KEPT]


@pytest.mark.parametrize(("rules", "expected"), [
    pytest.param([rule()], [ALL], id="masquerade-of-any-destination-before"),
    pytest.param([rule(AFTER)], [ALL], id="after-masqds-rules-it-sees-what-they-keep"),
    pytest.param([rule(INSIDE, position=1)], [], id="inside-masqds-chain-is-drift-not-shadowing"),
    pytest.param([rule(effect=EITHER)], [ALL], id="a-jump-that-may-masquerade"),
    pytest.param([rule(effect=KEEPS)], [], id="an-accept-keeps"),
    pytest.param([rule(destination="10.1.0.0/16", certain=True)], [["10.0.0.0/8"]], id="overlapping-one-kept-cidr"),
    pytest.param([rule(destination="0.0.0.0/1")], [["10.0.0.0/8"]], id="holding-a-kept-cidr"),
    pytest.param([rule(destination="203.0.113.0/24")], [], id="a-destination-masqd-masquerades-anyway"),
    pytest.param([rule(destination="10.0.0.0/8", negated=True)], [["169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"]],
                 id="negated-leaves-the-others"),
    pytest.param([rule(destination="10.0.0.0/9", negated=True)], [["169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12",
                                                                  "192.168.0.0/16"]], id="negated-part-of-a-kept-cidr"),
    pytest.param([rule(destination="0.0.0.0/0", negated=True)], [], id="negated-everything"),
    pytest.param([rule(mark=KUBE_PROXY_MARK)], [], id="marked-traffic-only-is-not-shadowing"),
    pytest.param([rule(kind="chain", mark="0x4000/0x4000")], [], id="a-chain-for-marked-traffic"),
    pytest.param([rule(kind="chain", text="table ip cni chain post priority 90")], [ALL], id="another-tables-chain"),
    pytest.param([rule(effect=KEEPS, destination="10.0.0.0/8", certain=True, text="ACCEPT 10/8"),
                  rule(effect=KEEPS, destination="192.168.0.0/24", certain=True, text="ACCEPT part of 192.168/16"),
                  rule(), rule(kind="chain")],
                 [["169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"], ALL],
                 id="an-accept-ahead-takes-its-destinations-from-later-rules-not-from-other-tables"),
    pytest.param([rule(effect=KEEPS, destination="10.0.0.0/8", text="ACCEPT 10/8 -p tcp"), rule()], [ALL],
                 id="a-conditional-accept-takes-nothing"),
])
def test_which_rules_shadow_the_keep_list(rules, expected):
    assert kept_by(family_shadowing(4, DEFAULT_KEPT, rules)) == expected


def test_shadowing_is_found_per_family_of_the_applied_rules():
    options = AgentOptions(enable_ipv6=True)
    ruleset = compute_ruleset(parse_config("nonMasqueradeCIDRs: [10.0.0.0/8, 2001:db8::/32]\n", options).config,
                              options)
    v6 = rule(destination="2001:db8:1::/48", text="-A POSTROUTING -d 2001:db8:1::/48 -j MASQUERADE")
    found = find_shadowing(ruleset, {4: (rule(destination="192.0.2.0/24"),), 6: (v6,)})
    assert [(item.label, item.rule.text, [str(n) for n in item.kept]) for item in found] == [
        ("ipv6", v6.text, ["2001:db8::/32"])]
    assert found[0].describe() == ("ipv6 -A POSTROUTING -d 2001:db8:1::/48 -j MASQUERADE (table nat chain POSTROUTING, "
                                   "before masqd's rules) may masquerade traffic masqd keeps: 2001:db8::/32")


def test_a_long_keep_list_is_shortened_in_messages():
    kept = tuple(net(f"10.{i}.0.0/16") for i in range(8))
    (found,) = family_shadowing(4, kept, [rule(AFTER, kind="chain", text="table ip x chain y priority 200")])
    assert found.kept_text() == "10.0.0.0/16, 10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16, 10.4.0.0/16 and 3 more"
    assert found.where == "another table's chain hooked at nat postrouting, after masqd's rules, which leave the " \
                          "traffic they keep to it"


@pytest.mark.parametrize(("mark", "meaning"), [
    pytest.param("0x4000/0x4000", KUBE_PROXY_MEANING, id="kube-proxy"),
    pytest.param("0x4000", KUBE_PROXY_MEANING, id="kube-proxy-without-mask"),
    pytest.param("0x1/0x1", "only traffic carrying packet mark 0x1/0x1 (set by another component) is masqueraded by "
                            "it, not by masqd", id="another-mark"),
])
def test_what_a_mark_means(mark, meaning):
    assert mark_meaning(mark) == meaning


def test_each_rule_is_reported_once_while_it_stays_and_again_when_it_comes_back():
    reported = Reported()
    cni, other = (Shadowing(4, rule(text=text), DEFAULT_KEPT) for text in ("CNI", "OTHER"))
    assert reported.update([cni]) == ((cni,), ())
    assert reported.update([cni]) == ((), ())
    assert reported.update([cni, other]) == ((other,), ())
    assert reported.update([other]) == ((), (cni,))
    assert reported.update([]) == ((), (other,))
    assert reported.update([cni]) == ((cni,), ())


def test_readyz_names_ten_rules_at_most_and_counts_the_rest():
    many = [Shadowing(4, rule(text=f"RULE-{i}"), DEFAULT_KEPT) for i in range(SUMMARY_RULES + 3)]
    text = summary(many)
    assert text.startswith(f"{SUMMARY_RULES + 3} rule(s)") and text.endswith("and 3 more (named in the log)")
    assert "RULE-9" in text and "RULE-10" not in text


# --- rule shapes as the tools print them (pure) -----------------------------------------------------------

MASQD_JUMP = ipt.jump_rule(CHAIN)
KEEP = '-m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN'
MASQD_CHAIN = (f"-A {CHAIN} -d 169.254.0.0/16 {KEEP}", f"-A {CHAIN} -d 10.0.0.0/8 {KEEP}",
               f'-A {CHAIN} -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last '
               'in chain)" -j MASQUERADE --random-fully')
#: the CNI bridge plugin's ipMasq rules (plugins/pkg/ip/ipmasq_linux.go), as iptables-save prints them
CNI_CHAIN = "CNI-a1b2c3d4e5f6a7b8c9d0e1f2"
CNI = (f':{CNI_CHAIN} - [0:0]',
       f'-A POSTROUTING -s 10.244.1.0/24 -m comment --comment "name: \\"cbr0\\" id: \\"abc123\\"" -j {CNI_CHAIN}',
       f'-A {CNI_CHAIN} -d 10.244.1.0/24 -m comment --comment "name: \\"cbr0\\" id: \\"abc123\\"" -j ACCEPT',
       f'-A {CNI_CHAIN} ! -d 224.0.0.0/4 -m comment --comment "name: \\"cbr0\\" id: \\"abc123\\"" -j MASQUERADE')
#: openshift-sdn's masquerade of pod traffic (pkg/network/node/iptables.go)
OPENSHIFT = (":OPENSHIFT-MASQUERADE - [0:0]",
             '-A POSTROUTING -m comment --comment "rules for masquerading OpenShift traffic" -j OPENSHIFT-MASQUERADE',
             '-A OPENSHIFT-MASQUERADE -s 10.128.0.0/14 -m comment --comment "masquerade pod-to-service and '
             'pod-to-external traffic" -j MASQUERADE')
#: kube-proxy's KUBE-POSTROUTING, as kube-proxy >= 1.20 writes it, and as older ones did
KUBE = (":KUBE-POSTROUTING - [0:0]",
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully")
KUBE_OLD = (":KUBE-POSTROUTING - [0:0]",
            '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -m mark --mark '
            "0x4000/0x4000 -j MASQUERADE")


def nat(*lines: str) -> str:
    declared = [line for line in lines if line.startswith(":")]
    rules = [line for line in lines if not line.startswith(":")]
    return "\n".join(["*nat", ":POSTROUTING ACCEPT [0:0]", f":{CHAIN} - [0:0]", *declared, *rules, "COMMIT"]) + "\n"


def iptables_findings(*lines: str) -> list[tuple[str, str, str | None]]:
    """(rule, stage, kept CIDRs it may masquerade or None, mark) of the POSTROUTING rules in ``lines``."""
    text = nat(*lines)
    live = ipt.live_family(ipt.parse_nat_state(text, CHAIN), 4, MASQD_CHAIN, CHAIN, ipt.parse_nat_chains(text))
    shadowing = {item.rule: item for item in family_shadowing(4, live.nonmasq, live.foreign)}
    return [(found.text.split(" -j ")[-1], found.stage, shadowing[found].kept_text() if found in shadowing else None,
             found.mark) for found in live.foreign if found.stage != INSIDE]


@pytest.mark.parametrize(("lines", "expected"), [
    pytest.param((*CNI, MASQD_JUMP, *MASQD_CHAIN),
                 [(CNI_CHAIN, BEFORE, "169.254.0.0/16, 10.0.0.0/8", None)], id="cni-bridge-before-the-jump"),
    pytest.param((MASQD_JUMP, *CNI, *MASQD_CHAIN),
                 [(CNI_CHAIN, AFTER, "169.254.0.0/16, 10.0.0.0/8", None)], id="cni-bridge-after-the-jump"),
    pytest.param((*OPENSHIFT, MASQD_JUMP, *MASQD_CHAIN),
                 [("OPENSHIFT-MASQUERADE", BEFORE, "169.254.0.0/16, 10.0.0.0/8", None)], id="openshift-sdn"),
    pytest.param((*KUBE, MASQD_JUMP, *MASQD_CHAIN), [("KUBE-POSTROUTING", BEFORE, None, "0x4000/0x4000")],
                 id="kube-proxy"),
    pytest.param((*KUBE_OLD, MASQD_JUMP, *MASQD_CHAIN), [("KUBE-POSTROUTING", BEFORE, None, "0x4000/0x4000")],
                 id="kube-proxy-before-1.20"),
    pytest.param((*KUBE, *CNI, MASQD_JUMP, *MASQD_CHAIN),
                 [("KUBE-POSTROUTING", BEFORE, None, "0x4000/0x4000"),
                  (CNI_CHAIN, BEFORE, "169.254.0.0/16, 10.0.0.0/8", None)], id="kube-proxy-and-cni"),
    pytest.param((":MARKS - [0:0]", "-A POSTROUTING -j MARKS", MASQD_JUMP, *MASQD_CHAIN,
                  "-A MARKS -m mark ! --mark 0x4000/0x4000 -j RETURN", "-A MARKS -m mark --mark 0x1/0x1 -j MASQUERADE",
                  "-A MARKS -p tcp -j MASQUERADE"),
                 [("MARKS", BEFORE, None, "0x4000/0x4000")], id="every-masquerade-after-a-return-unless-marked"),
    pytest.param((":MARKS - [0:0]", "-A POSTROUTING -j MARKS", MASQD_JUMP, *MASQD_CHAIN,
                  "-A MARKS -m mark --mark 0x1/0x1 -j MASQUERADE", "-A MARKS -p tcp -j MASQUERADE"),
                 [("MARKS", BEFORE, "169.254.0.0/16, 10.0.0.0/8", None)], id="one-unmarked-way-is-enough"),
    pytest.param(("-A POSTROUTING -m mark --mark 0x0/0x4000 -j MASQUERADE", MASQD_JUMP, *MASQD_CHAIN),
                 [("MASQUERADE", BEFORE, "169.254.0.0/16, 10.0.0.0/8", None)], id="a-mark-unmarked-traffic-has"),
    pytest.param(("-A POSTROUTING -d 10.96.0.0/12 -m mark ! --mark 0x4000/0x4000 -j RETURN",
                  "-A POSTROUTING -j MASQUERADE", MASQD_JUMP, *MASQD_CHAIN),
                 [("RETURN", BEFORE, None, None), ("MASQUERADE", BEFORE, "169.254.0.0/16, 10.0.0.0/8", None)],
                 id="a-return-with-other-matches-is-no-mark-condition"),
])
def test_iptables_rules_that_shadow_masqd(lines, expected):
    assert iptables_findings(*lines) == expected


def _structure(*objects: dict) -> str:
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *objects]})


def _table(name: str, family: str = "ip") -> dict:
    return {"table": {"family": family, "name": name, "handle": 1}}


def _chain(table: str, name: str, prio: int | None = None, family: str = "ip") -> dict:
    base = {} if prio is None else {"type": "nat", "hook": "postrouting", "prio": prio, "policy": "accept"}
    return {"chain": {"family": family, "table": table, "name": name, "handle": 1, **base}}


def _rule(table: str, chain: str, *expr: dict, family: str = "ip") -> dict:
    return {"rule": {"family": family, "table": table, "chain": chain, "handle": 2, "expr": list(expr)}}


def _mark(op: str, mask: int | None, value: int) -> dict:
    left = {"meta": {"key": "mark"}} if mask is None else {"&": [{"meta": {"key": "mark"}}, mask]}
    return {"match": {"op": op, "left": left, "right": value}}


SADDR_PODS = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}
MASQ, RETURN, COUNTER = {"masquerade": None}, {"return": None}, {"counter": {"packets": 0, "bytes": 0}}
XT_MASQ, XT_COMMENT = {"xt": {"type": "target", "name": "MASQUERADE"}}, {"xt": {"type": "match", "name": "comment"}}
#: kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go)
KUBE_NFT = (_table("kube-proxy"), _chain("kube-proxy", "nat-postrouting", 100), _chain("kube-proxy", "masquerading"),
            _rule("kube-proxy", "nat-postrouting", {"jump": {"target": "masquerading"}}),
            _rule("kube-proxy", "masquerading", _mark("==", 0x4000, 0), RETURN),
            _rule("kube-proxy", "masquerading", {"mangle": {"key": {"meta": {"key": "mark"}},
                                                            "value": {"^": [{"meta": {"key": "mark"}}, 0x4000]}}}),
            _rule("kube-proxy", "masquerading", {"masquerade": {"flags": "fully-random"}}))
#: kube-proxy's iptables mode through iptables-nft, as nft lists it
KUBE_IPTABLES_NFT = (_table("nat"), _chain("nat", "POSTROUTING", 100), _chain("nat", "KUBE-POSTROUTING"),
                     _rule("nat", "POSTROUTING", XT_COMMENT, COUNTER, {"jump": {"target": "KUBE-POSTROUTING"}}),
                     _rule("nat", "KUBE-POSTROUTING", _mark("!=", 0x4000, 0x4000), COUNTER, RETURN),
                     _rule("nat", "KUBE-POSTROUTING", COUNTER, {"xt": {"type": "target", "name": "MARK"}}),
                     _rule("nat", "KUBE-POSTROUTING", XT_COMMENT, COUNTER, XT_MASQ))
CNI_NFT = (_table("cni"), _chain("cni", "post", 90), _rule("cni", "post", SADDR_PODS, MASQ))


@pytest.mark.parametrize(("objects", "expected"), [
    pytest.param(KUBE_NFT, [("table ip kube-proxy chain nat-postrouting", "0x4000/0x4000", False)], id="kube-proxy"),
    pytest.param(KUBE_IPTABLES_NFT, [("table ip nat chain POSTROUTING", "0x4000/0x4000", False)],
                 id="kube-proxy-through-iptables-nft"),
    pytest.param((*CNI_NFT, *KUBE_NFT), [("table ip cni chain post", None, True),
                                         ("table ip kube-proxy chain nat-postrouting", "0x4000/0x4000", False)],
                 id="a-cni-table-and-kube-proxy"),
    pytest.param((*KUBE_IPTABLES_NFT, _chain("nat", "CNI-x"),
                  _rule("nat", "POSTROUTING", SADDR_PODS, COUNTER, {"jump": {"target": "CNI-x"}}),
                  _rule("nat", "CNI-x", COUNTER, XT_MASQ)),
                 [("table ip nat chain POSTROUTING", None, True)], id="iptables-nft-with-a-cni-rule-too"),
    pytest.param((_table("t"), _chain("t", "c", 100), _rule("t", "c", _mark("==", 0x1, 0x1), MASQ)),
                 [("table ip t chain c", "0x1/0x1", False)], id="a-marked-masquerade"),
    pytest.param((_table("t"), _chain("t", "c", 100), _rule("t", "c", _mark("==", None, 0x20), MASQ)),
                 [("table ip t chain c", "0x20/0xffffffff", False)], id="a-whole-mark"),
    pytest.param((_table("t"), _chain("t", "c", 100), _rule("t", "c", _mark("==", 0x1, 0), MASQ)),
                 [("table ip t chain c", None, True)], id="a-mark-unmarked-traffic-has"),
    pytest.param((_table("t"), _chain("t", "c", 100), _rule("t", "c", _mark("!=", 0x4000, 0), RETURN), _rule("t", "c", MASQ)),
                 [("table ip t chain c", None, True)], id="returning-the-marked-traffic-leaves-the-unmarked"),
    pytest.param((_table("t"), _chain("t", "c", 200), _chain("t", "a"), _chain("t", "b"),
                  _rule("t", "c", {"jump": {"target": "a"}}), _rule("t", "c", {"jump": {"target": "b"}}),
                  _rule("t", "a", _mark("==", 0x4000, 0), RETURN), _rule("t", "a", MASQ), _rule("t", "b", MASQ)),
                 [("table ip t chain c", None, True)], id="one-chain-of-two-without-a-mark"),
])
def test_nft_chains_that_shadow_masqd(objects, expected):
    found = other_nat_chains(_structure(*objects), 4, 110)
    shadowing = {item.rule for item in family_shadowing(4, DEFAULT_KEPT, found)}
    assert [(rule.text.rsplit(" priority", 1)[0], rule.mark, rule in shadowing) for rule in found] == expected


# --- explain ---------------------------------------------------------------------------------------------


SHADOWING_LINE = ("  shadowing: masqd keeps it, but a rule named above may masquerade it all the same (counted in "
                  "masqd_shadowing_rules)")


def _explained(foreign: tuple[ForeignRule, ...], address: str = "10.1.2.3") -> str:
    text = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"
    ruleset = compute_ruleset(parse_config(text, AgentOptions()).config, AgentOptions())
    merged = merge_configs([("cfg", parse_config(text, AgentOptions()).config)], AgentOptions())
    origins = cidr_origins(ruleset, merged, (), AgentOptions(), {"cfg": text})
    live = LiveRules("iptables", f"chain {CHAIN}", (LiveFamily(4, present=True, hooked=True, local_exempt=True,
                                                               nonmasq=(net("169.254.0.0/16"), net("10.0.0.0/8")),
                                                               masquerade=True, foreign=foreign),))
    return format_text(explain([ipaddress.ip_address(address)], ruleset, origins, live))


def test_explain_says_what_kube_proxys_mark_means_and_keeps_its_verdict():
    text = nat(*KUBE, MASQD_JUMP, *MASQD_CHAIN)
    (kube,) = ipt.postrouting_rules(ipt.parse_nat_chains(text), CHAIN, 4)
    lines = _explained((kube,)).splitlines()
    assert lines[1] == "10.1.2.3: keeps the pod source address (not masqueraded)"
    assert f"  may act first on marked traffic ({kube.text}, mark 0x4000/0x4000): {KUBE_PROXY_MEANING}" in lines
    assert SHADOWING_LINE not in lines
    assert lines[-1].startswith("the kernel holds the desired state")


def test_explain_names_the_rule_that_shadows_a_kept_address():
    text = nat(*CNI, MASQD_JUMP, *MASQD_CHAIN)
    (cni,) = ipt.postrouting_rules(ipt.parse_nat_chains(text), CHAIN, 4)
    lines = _explained((cni,)).splitlines()
    assert lines[1:4] == ["10.1.2.3: uncertain: rules masqd does not write may decide",
                          "  masqd's rules: keeps the pod source address (not masqueraded)",
                          "  matched 10.0.0.0/8 from cfg line 1"]
    assert f"  may act first: {cni.text} (it may masquerade or end nat processing)" in lines
    assert SHADOWING_LINE in lines
    assert "rules masqd does not write may decide otherwise for 10.1.2.3" in lines[-1]


# --- the reconciler, the status, the metrics (in process) ------------------------------------------------


class ForeignRulesBackend(DryRunBackend):
    """The dry-run backend, with rules masqd does not write beside its own (``foreign``, per family)."""

    def __init__(self) -> None:
        super().__init__()
        self.foreign: dict[int, tuple[ForeignRule, ...]] = {}
        self.foreign_reads = 0

    async def foreign_rules(self, ruleset):
        self.foreign_reads += 1
        return {family.family: self.foreign.get(family.family, ()) for family in ruleset.families}

    async def read_back(self, ruleset):
        live = await super().read_back(ruleset)
        return dataclasses.replace(live, families=tuple(dataclasses.replace(family, foreign=self.foreign.get(family.family, ()))
                                                        for family in live.families))


CNI_RULE = rule(text=f"-A POSTROUTING -s 10.244.1.0/24 -j {CNI_CHAIN}", effect=EITHER)
KUBE_RULE = rule(text="-A POSTROUTING -j KUBE-POSTROUTING", mark=KUBE_PROXY_MARK)
WARNING = "a rule masqd does not write may masquerade traffic masqd keeps"
GONE = "the rule that could masquerade traffic masqd keeps is gone"


async def test_each_pass_checks_and_a_rule_is_warned_about_once(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n")
    backend = ForeignRulesBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    backend.foreign = {4: (KUBE_RULE,)}
    with structlog.testing.capture_logs() as logs:
        await reconciler.reconcile()
        assert reconciler.status.shadowing == ()
        backend.foreign = {4: (KUBE_RULE, CNI_RULE)}
        for _ in range(3):
            await reconciler.reconcile((Event("timer"),))
        (found,) = reconciler.status.shadowing
        assert (found.rule, [str(n) for n in found.kept]) == (CNI_RULE, ["169.254.0.0/16", "10.0.0.0/8", "192.0.2.0/24"])
        backend.foreign = {}
        await reconciler.reconcile((Event("timer"),))
        assert reconciler.status.shadowing == ()
    assert backend.foreign_reads == 5
    warnings = [e for e in logs if e["event"] == WARNING]
    assert warnings == [{"event": WARNING, "log_level": "warning", "family": "ipv4", "rule": CNI_RULE.text,
                         "where": "table nat chain POSTROUTING, before masqd's rules",
                         "kept": "169.254.0.0/16, 10.0.0.0/8, 192.0.2.0/24", "kept_count": 3}]
    assert [(e["event"], e["rule"]) for e in logs if e["event"] == GONE] == [(GONE, CNI_RULE.text)]


async def test_the_drift_check_checks_too_without_reading_again(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = ForeignRulesBackend()
    reconciler = Reconciler(backend, AgentOptions(), config)
    await reconciler.reconcile()
    backend.foreign = {4: (CNI_RULE,)}
    assert await reconciler.check_drift() is None
    assert [item.rule for item in reconciler.status.shadowing] == [CNI_RULE]
    assert backend.foreign_reads == 1  # the drift check's own read-back was enough
    backend.foreign = {}
    await reconciler.check_drift()
    assert reconciler.status.shadowing == ()


def test_readyz_names_the_rules_and_stays_ready() -> None:
    ruleset = compute_ruleset(parse_config("nonMasqueradeCIDRs: [10.0.0.0/8]\n", AgentOptions()).config,
                              AgentOptions())
    status = AgentStatus(applied=ruleset, latest_valid=ruleset, applied_at=0)
    ready, before = status.readiness()
    status.shadowing = find_shadowing(ruleset, {4: (CNI_RULE, KUBE_RULE)})
    assert status.readiness() == (True, before + (
        f"; 1 rule(s) masqd does not write may masquerade traffic it keeps (shadowing): ipv4 {CNI_RULE.text} "
        "(table nat chain POSTROUTING, before masqd's rules) may masquerade traffic masqd keeps: 169.254.0.0/16, "
        "10.0.0.0/8"))
    assert ready and "shadowing" not in before


def _gauge(agent, name: str = "masqd_shadowing_rules") -> dict[str, float]:
    text = agent.metrics.render().decode()
    return {m["family"]: float(m["value"]) for m in re.finditer(rf'^{name}{{family="(?P<family>\w+)"}} (?P<value>\S+)$',
                                                                 text, re.M)}


@pytest.mark.parametrize(("options", "families"), [
    pytest.param(AgentOptions(), {"ipv4": 0.0}, id="ipv4"),
    pytest.param(AgentOptions(enable_ipv6=True), {"ipv4": 0.0, "ipv6": 0.0}, id="ipv4-and-ipv6"),
])
async def test_the_gauge_is_exported_at_zero_from_start_up_and_counts_rules(tmp_path: Path, options, families) -> None:
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    backend = ForeignRulesBackend()
    agent = build_agent(options, backend=backend, config=config, http_address=Address("127.0.0.1", 0))
    assert _gauge(agent) == families
    backend.foreign = {4: (CNI_RULE, KUBE_RULE, rule(AFTER, text="-A POSTROUTING -o eth0 -j MASQUERADE"))}
    await agent.reconciler.reconcile()
    assert _gauge(agent) == {**families, "ipv4": 2.0}


# --- against the kernel ------------------------------------------------------------------------------------

HOUR = "resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n"
#: nft backend: no drift check (its monitor follows masqd's tables only), so passes come from the timer
OFTEN = "resyncInterval: 100ms\nnonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n"
CNI_TABLE = "table ip cni {\n chain post {\n  type nat hook postrouting priority srcnat - 10\n" \
            "  ip saddr 10.244.0.0/16 masquerade\n }\n}\n"


def http(ns: str, path: str) -> tuple[int, str]:
    """The status and body of the daemon's endpoint at ``path``, read inside ``ns``."""
    script = ("import urllib.request, urllib.error, sys\n"
              "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
              "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())")
    out = netns.run(ns, sys.executable, "-c", script, f"http://127.0.0.1:{DEFAULT_ADDRESS.rsplit(':', 1)[1]}{path}").stdout
    status, _, body = out.partition("\n")
    return int(status), body.strip()


def gauge(ns: str) -> dict[str, float]:
    _, text = http(ns, "/metrics")
    return {m["family"]: float(m["value"]) for m in
            re.finditer(r'^masqd_shadowing_rules{family="(?P<family>\w+)"} (?P<value>\S+)$', text, re.M)}


def checked(event: dict) -> bool:
    """A drift check or a pass that found the kernel as it should be (each looks for shadowing)."""
    return event.get("event") in ("drift check: the kernel holds the rules last applied", "in sync")


def warnings(process) -> list[dict]:
    return [e for e in process.events if e.get("event") == WARNING]


def first_warning(process) -> dict:
    """The first shadowing warning, maybe logged already (by the first pass, before its write's line)."""
    return next(iter(warnings(process)), None) or process.next_event(lambda e: e.get("event") == WARNING)


def cni_iptables(ns: str) -> None:
    netns.run(ns, "iptables-restore", "--noflush", input="*nat\n" + "\n".join(CNI) + "\nCOMMIT\n")


def openshift_iptables(ns: str) -> None:
    netns.run(ns, "iptables-restore", "--noflush", input="*nat\n" + "\n".join(OPENSHIFT) + "\nCOMMIT\n")


def remove_iptables(ns: str) -> None:
    netns.run(ns, "iptables", "-t", "nat", "-D", "POSTROUTING", *shlex.split(CNI[1])[2:])
    netns.run(ns, "iptables", "-t", "nat", "-F", CNI_CHAIN)
    netns.run(ns, "iptables", "-t", "nat", "-X", CNI_CHAIN)
    netns.run(ns, "iptables", "-t", "nat", "-D", "POSTROUTING", *shlex.split(OPENSHIFT[1])[2:])
    netns.run(ns, "iptables", "-t", "nat", "-F", "OPENSHIFT-MASQUERADE")
    netns.run(ns, "iptables", "-t", "nat", "-X", "OPENSHIFT-MASQUERADE")


@pytest.mark.netns
def test_iptables_cni_and_openshift_rules_are_found_on_drift_checks_and_warned_about_once(node_ns, daemon):
    cni_iptables(node_ns)  # there before masqd: ahead of its jump
    d = daemon(HOUR, "--drift-check-interval=100ms")
    first = first_warning(d)
    assert first["rule"] == CNI[1] and first["where"] == "table nat chain POSTROUTING, before masqd's rules"
    assert first["kept"] == "169.254.0.0/16, 10.0.0.0/8, 192.0.2.0/24"
    openshift_iptables(node_ns)  # added later: after masqd's jump, where it still sees what masqd keeps
    second = d.next_event(lambda e: e.get("event") == WARNING)
    assert second["rule"] == OPENSHIFT[1]
    assert second["where"] == "table nat chain POSTROUTING, after masqd's rules, which leave the traffic they keep to it"
    for _ in range(5):
        d.next_event(checked)
    assert [e["rule"] for e in warnings(d)] == [CNI[1], OPENSHIFT[1]]
    assert gauge(node_ns) == {"ipv4": 2.0}
    status, body = http(node_ns, "/readyz")
    assert status == 200 and body.startswith("ready: the kernel holds the desired rules"), body
    assert "2 rule(s) masqd does not write may masquerade traffic it keeps (shadowing)" in body
    assert CNI[1] in body and OPENSHIFT[1] in body
    remove_iptables(node_ns)
    gone = {d.next_event(lambda e: e.get("event") == GONE)["rule"] for _ in range(2)}
    assert gone == {CNI[1], OPENSHIFT[1]}
    assert gauge(node_ns) == {"ipv4": 0.0}
    assert "shadowing" not in http(node_ns, "/readyz")[1]
    assert d.writes()[1:] == []  # all of it read, nothing written


@pytest.mark.netns
def test_nft_table_of_another_agent_is_found_on_each_pass(node_ns, daemon):
    d = daemon(OFTEN, backend="nftables")
    netns.nft(node_ns, "-f", "-", input=CNI_TABLE)
    found = d.next_event(lambda e: e.get("event") == WARNING)
    assert found["rule"] == "table ip cni chain post priority 90"
    assert found["where"] == "another table's chain hooked at nat postrouting, before masqd's rules"
    for _ in range(5):
        d.next_event(checked)
    assert len(warnings(d)) == 1
    assert gauge(node_ns) == {"ipv4": 1.0}
    status, body = http(node_ns, "/readyz")
    assert status == 200 and "table ip cni chain post priority 90" in body, body
    netns.nft(node_ns, "delete", "table", "ip", "cni")
    assert d.next_event(lambda e: e.get("event") == GONE)["rule"] == "table ip cni chain post priority 90"
    assert gauge(node_ns) == {"ipv4": 0.0}


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_kube_proxy_rules_alone_are_not_shadowing(node_ns, daemon, tmp_path, backend):
    kube_proxy.load_iptables(node_ns)  # iptables mode (through iptables-nft here, seen by both backends)
    if backend == "nftables":
        kube_proxy.load_nft(node_ns)
    d = daemon(OFTEN, "--drift-check-interval=100ms", backend=backend)
    for _ in range(5):
        d.next_event(checked)
    assert warnings(d) == []
    assert gauge(node_ns) == {"ipv4": 0.0}
    status, body = http(node_ns, "/readyz")
    assert status == 200 and "shadowing" not in body, body
    # masqd does see kube-proxy's masquerade, and says what it is
    explained = netns.run(node_ns, sys.executable, "-m", "masqd", "explain", "--live", "--backend", backend,
                          "--config", str(tmp_path / "config"), "192.0.2.7", check=False)
    assert "192.0.2.7: keeps the pod source address (not masqueraded)" in explained.stdout, explained
    assert explained.stdout.count(f"mark 0x4000/0x4000): {KUBE_PROXY_MEANING}") == (2 if backend == "nftables" else 1)
    assert explained.returncode == 0, explained


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_shadowing_rule_does_masquerade_kept_traffic(topology, tmp_path, backend):
    """What the gauge says is so: while it counts the rule, traffic to a kept destination leaves
    with the node's address; once the rule is gone, with the pod's."""
    from masqd_proc import DaemonProcess

    config = tmp_path / "config"
    config.write_text(OFTEN)
    node = topology.node
    if backend == "iptables":
        cni_iptables(node)
    else:
        netns.nft(node, "-f", "-", input=CNI_TABLE)
    d = DaemonProcess(node, config, "--drift-check-interval=100ms", backend=backend)
    try:
        first_warning(d)
        assert gauge(node) == {"ipv4": 1.0}
        assert topology.source_seen("192.0.2.2") == NODE_V4  # kept by masqd, masqueraded all the same
        explained = netns.run(node, sys.executable, "-m", "masqd", "explain", "--live", "--backend", backend,
                              "--config", str(config), "192.0.2.2").stdout
        assert "192.0.2.2: uncertain: rules masqd does not write may decide" in explained, explained
        assert SHADOWING_LINE in explained.splitlines(), explained
        if backend == "iptables":
            netns.run(node, "iptables", "-t", "nat", "-D", "POSTROUTING", *shlex.split(CNI[1])[2:])
        else:
            netns.nft(node, "delete", "table", "ip", "cni")
        d.next_event(lambda e: e.get("event") == GONE)
        assert gauge(node) == {"ipv4": 0.0}
        assert topology.source_seen("192.0.2.2") == POD_V4
    finally:
        d.kill()


@pytest.mark.netns
def test_ipv6_rules_are_counted_apart(node_ns, daemon):
    d = daemon("resyncInterval: 100ms\nnonMasqueradeCIDRs: [10.0.0.0/8, 2001:db8::/32]\n", "--enable-ipv6",
               backend="nftables")
    assert gauge(node_ns) == {"ipv4": 0.0, "ipv6": 0.0}
    netns.nft(node_ns, "-f", "-", input=CNI_TABLE.replace("ip cni", "ip6 cni").replace(
        "ip saddr 10.244.0.0/16", "ip6 saddr fd00:10:244::/56"))
    found = first_warning(d)
    assert (found["family"], found["rule"], found["kept"]) == ("ipv6", "table ip6 cni chain post priority 90",
                                                              "fe80::/10, 2001:db8::/32")
    assert gauge(node_ns) == {"ipv4": 0.0, "ipv6": 1.0}
