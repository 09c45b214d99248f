"""The daemon's iptables config edits against the real kernel, both iptables variants, inside
throw-away network namespaces.

A running daemon knows the chain it wrote, so a config edit changes only the rules that differ
(one rule deleted by its text, one inserted at its position); the kernel ends with exactly the
chain the compatibility contract gives for the new config, and every other rule stays the object
it was (nft rule handles are new for a rewritten rule, so unchanged handles prove it was left
alone). A chain someone else changed is rewritten whole, the foreign rule gone; and nothing is
written while nothing changes. Expected rule texts are written out here from the contract, and
the kernel is read with the iptables tools, never with masqd's parser.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys

import pytest

from masqd.testing import netns
from masqd.testing.netns import CHAIN, jump_rule

pytestmark = pytest.mark.netns

KEEP_COMMENT = "ip-masq-agent: local traffic is not subject to MASQUERADE"
MASQ_COMMENT = "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)"
BEFORE = ("198.51.100.0/24", "203.0.113.0/24", "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16")
AFTER = ("198.51.100.0/24", "203.0.113.0/24", "10.1.0.0/16", "10.9.0.0/16", "10.3.0.0/16")
VARIANTS = [pytest.param("nft", id="iptables-nft"), pytest.param("legacy", id="iptables-legacy")]


def config(cidrs: tuple[str, ...], resync: str = "1h") -> str:
    return f"resyncInterval: {resync}\nnonMasqueradeCIDRs: [{', '.join(cidrs)}]\n"


def expected_chain(cidrs: tuple[str, ...]) -> list[str]:
    """The upstream agent's chain for ``cidrs`` (link-local first), as iptables-save prints it."""
    keeps = [f'-A {CHAIN} -d {cidr} -m comment --comment "{KEEP_COMMENT}" -j RETURN'
             for cidr in ("169.254.0.0/16", *cidrs)]
    return [*keeps, f'-A {CHAIN} -m comment --comment "{MASQ_COMMENT}" -j MASQUERADE --random-fully']


def saved(ns: str, variant: str) -> list[str]:
    """The nat table of ``ns`` as this variant's iptables-save prints it."""
    return netns.iptables_save(ns, binary=f"iptables-{variant}-save").splitlines()


def chain_of(ns: str, variant: str) -> list[str]:
    return [line for line in saved(ns, variant) if line.startswith(f"-A {CHAIN} ")]


def rule_handles(ns: str) -> list[int]:
    """The nft handles of the chain's rules, in order (iptables-nft rules are nf_tables rules)."""
    listing = netns.nft(ns, "-a", "list", "chain", "ip", "nat", CHAIN).stdout
    return [int(handle) for handle in re.findall(r"# handle (\d+)$", listing, re.MULTILINE)[1:]]  # [0]: the chain's


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    if shutil.which(f"iptables-{request.param}-save") is None or shutil.which(f"iptables-{request.param}-restore") is None:
        pytest.skip(f"iptables-{request.param} is not installed")
    return request.param


def edit_config(tmp_path, text: str) -> None:
    staged = tmp_path / "staged"
    staged.write_text(text)
    os.replace(staged, tmp_path / "config")


def test_a_config_edit_changes_only_the_rule_that_differs(node_ns, daemon, tmp_path, variant):
    d = daemon(config(BEFORE), "--iptables-mode", variant)
    assert chain_of(node_ns, variant) == expected_chain(BEFORE)
    handles = rule_handles(node_ns) if variant == "nft" else None

    edit_config(tmp_path, config(AFTER))
    update = d.next_event(lambda e: e.get("event") == "rules updated")
    assert update["cidrs_added"] == ["10.9.0.0/16"] and update["cidrs_removed"] == ["10.2.0.0/16"]
    assert update["reason"] == [f"chain {CHAIN} edited in place: 1 rule(s) deleted, 1 inserted"]
    table = saved(node_ns, variant)
    assert [line for line in table if line.startswith(f"-A {CHAIN} ")] == expected_chain(AFTER)
    assert table.count(jump_rule()) == 1
    if handles is not None:
        after = rule_handles(node_ns)
        assert len(after) == len(handles)
        # every rule but the changed one (the 5th: link-local first) is the rule it was
        assert after[:4] + after[5:] == handles[:4] + handles[5:] and after[4] not in handles


def test_after_an_edit_resyncs_write_nothing(node_ns, daemon, tmp_path, variant):
    d = daemon(config(BEFORE, resync="100ms"), "--iptables-mode", variant)
    edit_config(tmp_path, config(AFTER, resync="100ms"))
    d.next_event(lambda e: e.get("event") == "rules updated")
    table = saved(node_ns, variant)
    handles = rule_handles(node_ns) if variant == "nft" else None
    for _ in range(5):  # ticks that read the kernel back and find it as the edit left it
        d.next_event(lambda e: e.get("trigger") == "timer" and e.get("event") == "in sync")
    assert [e for e in d.writes() if e.get("trigger") == "timer"] == []
    assert saved(node_ns, variant) == table
    if handles is not None:
        assert rule_handles(node_ns) == handles


def test_a_chain_someone_changed_is_rewritten_whole_by_the_next_edit(node_ns, daemon, tmp_path, variant):
    d = daemon(config(BEFORE), "--iptables-mode", variant, "--drift-check-interval", "0")
    tool = f"iptables-{variant}"
    netns.run(node_ns, tool, "-t", "nat", "-I", CHAIN, "1", "-d", "192.0.2.0/24", "-j", "RETURN")
    netns.run(node_ns, tool, "-t", "nat", "-D", CHAIN, "-d", "10.3.0.0/16", "-m", "comment", "--comment",
              KEEP_COMMENT, "-j", "RETURN")

    edit_config(tmp_path, config(AFTER))
    update = d.next_event(lambda e: e.get("event") == "rules updated")
    assert update["reason"] == [f"chain {CHAIN} differs"]
    table = saved(node_ns, variant)
    assert [line for line in table if line.startswith(f"-A {CHAIN} ")] == expected_chain(AFTER)
    assert table.count(jump_rule()) == 1


#: Inside the namespace: a backend writes BEFORE, then syncs AFTER while another writer deletes
#: the rule the edit deletes right after the edit's read-back; prints the restore scripts.
_RACED_EDIT = """
import sys, anyio
from masqd.backends.iptables import IptablesBackend, SubprocessExecutor
from masqd.backends.iptables_mode import binaries_for
from masqd.config import AgentOptions, parse_config
from masqd.ruleset import compute_ruleset
from masqd.testing import netns

variant, before, after, gone = sys.argv[1:5]

class Raced(SubprocessExecutor):
    saves = 0
    scripts = []

    async def save(self, family):
        text = await super().save(family)
        self.saves += 1
        if self.saves == 3:  # 1: the first write, 2: its check, 3: the edit's read-back
            netns.run(None, f"iptables-{variant}", "-t", "nat", "-D", "IP-MASQ-AGENT", "-d", gone,
                      "-m", "comment", "--comment", "ip-masq-agent: local traffic is not subject to MASQUERADE",
                      "-j", "RETURN")
        return text

    async def restore(self, family, text):
        self.scripts.append(text)
        await super().restore(family, text)

def ruleset(text):
    return compute_ruleset(parse_config(text, AgentOptions()).config, AgentOptions())

async def main():
    executor = Raced(binaries_for(variant))
    backend = IptablesBackend(executor)
    await backend.sync(ruleset(before))
    result = await backend.sync(ruleset(after))
    print(repr((result.reasons, [":IP-MASQ-AGENT " not in script for script in executor.scripts])))

anyio.run(main)
"""


def test_an_edit_refused_because_the_chain_changed_meanwhile_is_rewritten_whole(node_ns, variant):
    result = netns.run(node_ns, sys.executable, "-c", _RACED_EDIT, variant, config(BEFORE), config(AFTER),
                       "10.2.0.0/16")
    reasons, edits = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert edits == [False, True, False]  # the first write, the refused edit, the rewrite
    assert reasons == (f"chain {CHAIN} differs",)
    table = saved(node_ns, variant)
    assert [line for line in table if line.startswith(f"-A {CHAIN} ")] == expected_chain(AFTER)
    assert table.count(jump_rule()) == 1
