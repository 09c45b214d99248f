"""The iptables backend's sync against a fake kernel: what it writes, when, and what it reads back.

The fake (:class:`FakeNatKernel`) applies ``iptables-restore --noflush`` input as iptables does:
all of it at ``COMMIT`` or none of it, a ``-D`` of a rule that is not there or an ``-I`` past the
end refused with the failing line named. Every sync reads the kernel back first; a chain this
backend knows line for line (it wrote it, or read it back equal to what it wanted) is edited in
place, anything else is rewritten whole and read back at once. Expected chains are what a first
write of the same config gives, so an edit is held to the same result as a rewrite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_nat import CHAIN, JUMP, RESTORE, FakeNatKernel

from masqd.backends.iptables import (
    MAX_EDIT_DELETES,
    MAX_EDIT_LINES,
    IptablesBackend,
    RenderedRules,
    family_rules,
    plan_edit,
)
from masqd.config import AgentOptions, parse_config, parse_to_ports
from masqd.errors import ApplyError, BackendError, ReadBackError
from masqd.ruleset import compute_ruleset

GOLDEN = Path(__file__).parent / "golden" / "iptables"
NONMASQ = '-m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN'


def golden(name: str) -> str:
    return (GOLDEN / f"{name}.txt").read_text()


def ruleset_for(config_text: str | None, options: AgentOptions | None = None):
    options = options or AgentOptions()
    return compute_ruleset(parse_config(config_text, options).config, options)


def listing(*cidrs: str) -> str:
    """A config listing ``cidrs`` (room for up to 1000)."""
    return "cidrLimit: 1000\nnonMasqueradeCIDRs: [" + ", ".join(f'"{c}"' for c in cidrs) + "]\n"


def blocks(count: int, start: int = 0) -> list[str]:
    """``count`` distinct /24s in 10.0.0.0/8."""
    return [f"10.{(start + i) // 256}.{(start + i) % 256}.0/24" for i in range(count)]


async def whole_chain(config_text: str | None, options: AgentOptions | None = None, family: int = 4) -> list[str]:
    """The chain a first write of ``config_text`` leaves in an empty kernel."""
    kernel = FakeNatKernel()
    await IptablesBackend(kernel).sync(ruleset_for(config_text, options))
    return kernel.chain(family)


def is_edit(script: str) -> bool:
    """An edit in place: it never declares (so never flushes) the chain."""
    return f":{CHAIN} " not in script


# --- first writes, no-ops, heals --------------------------------------------------------------------


async def test_first_sync_writes_and_second_sync_writes_nothing():
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    ruleset = ruleset_for(None, AgentOptions())

    first = await backend.sync(ruleset)
    assert first.changed and first.written == ("ipv4",)
    assert kernel.restores == [(4, golden("defaults").removeprefix("# iptables-restore --noflush\n"))]

    second = await backend.sync(ruleset)
    assert not second.changed
    assert len(kernel.restores) == 1
    assert ("save", 4) in kernel.calls[-1:]


async def test_sync_heals_decay_and_duplicate_jumps():
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    ruleset = ruleset_for(None, AgentOptions())
    await backend.sync(ruleset)
    applied = list(kernel.chain())

    kernel.chain().pop(1)  # someone deleted a rule
    kernel.chains[4]["POSTROUTING"] += [JUMP, JUMP]  # and appended the jump twice more
    healed = await backend.sync(ruleset)
    assert healed.written == ("ipv4",)
    assert kernel.chain() == applied
    assert kernel.jump_count(4) == 1
    assert not (await backend.sync(ruleset)).changed


async def test_sync_writes_both_families_with_ipv6_and_never_duplicates_jumps():
    kernel = FakeNatKernel()
    options = AgentOptions(enable_ipv6=True)
    backend = IptablesBackend(kernel)
    ruleset = ruleset_for('nonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8", 192.168.0.0/16, "2001:db8::/32"]\n', options)
    result = await backend.sync(ruleset)
    assert result.written == ("ipv4", "ipv6")
    sections = golden("ipv6").split("# ip6tables-restore --noflush\n")
    assert kernel.restores == [
        (4, sections[0].removeprefix("# iptables-restore --noflush\n")),
        (6, sections[1]),
    ]
    for _ in range(3):
        assert not (await backend.sync(ruleset)).changed
    assert kernel.jump_count(4) == kernel.jump_count(6) == 1


async def test_sync_rewrites_when_the_config_changes():
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(None, AgentOptions()))
    result = await backend.sync(ruleset_for("masqLinkLocal: true\n", AgentOptions()))
    assert result.written == ("ipv4",)
    saved = await kernel.save(4)
    assert "169.254.0.0/16" not in saved
    assert kernel.jump_count(4) == 1


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        pytest.param("iptables v1.6.1", False, id="1.6.1-too-old"),
        pytest.param("iptables v1.6.2", True, id="1.6.2-first-with-random-fully"),
        pytest.param("iptables v1.8.9 (nf_tables)", True, id="1.8.9-nf_tables"),
        pytest.param("iptables v1.8.7 (legacy)", True, id="1.8.7-legacy"),
        pytest.param("iptables v1.4.21", False, id="1.4.21"),
    ],
)
async def test_random_fully_is_used_only_when_the_binary_supports_it(version, supported):
    kernel = FakeNatKernel(version)
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(None, AgentOptions()))
    await backend.probe()
    assert backend.random_fully_supported is supported
    (_, text), = kernel.restores
    expected = golden("defaults" if supported else "random_fully_false")
    assert text == expected.removeprefix("# iptables-restore --noflush\n")


async def test_random_fully_false_flag_wins_over_a_capable_binary():
    kernel = FakeNatKernel("iptables v1.8.9 (nf_tables)")
    await IptablesBackend(kernel).sync(ruleset_for(None, AgentOptions(random_fully=False)))
    (_, text), = kernel.restores
    assert "--random-fully" not in text


# --- edits in place -----------------------------------------------------------------------------------


async def test_a_one_line_edit_deletes_and_inserts_that_rule_only():
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing("10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16")))
    kernel.calls.clear()

    edited = listing("10.1.0.0/16", "10.9.0.0/16", "10.3.0.0/16")
    result = await backend.sync(ruleset_for(edited))
    assert result.written == ("ipv4",)
    assert kernel.restores[-1] == (4, (f"*nat\n-D {CHAIN} -d 10.2.0.0/16 {NONMASQ}\n"
                                       f"-I {CHAIN} 3 -d 10.9.0.0/16 {NONMASQ}\nCOMMIT\n"))
    assert kernel.chain() == await whole_chain(edited)
    assert kernel.jump_count(4) == 1
    # read back before writing; what the edit wrote is checked by the next read-back
    assert kernel.calls == [("save", 4), ("restore", 4)]

    kernel.calls.clear()
    assert not (await backend.sync(ruleset_for(edited))).changed
    assert kernel.calls == [("save", 4)]


TO_PORTS = AgentOptions(to_ports=parse_to_ports("1024-29999,32768-65535"))
IPV6 = AgentOptions(enable_ipv6=True)


@pytest.mark.parametrize(
    ("before", "after", "options", "edited"),
    [
        pytest.param(listing(*blocks(5)), listing(*blocks(6)), AgentOptions(), True, id="one-added-last"),
        pytest.param(listing(*blocks(5)), listing("192.168.0.0/16", *blocks(5)), AgentOptions(), True,
                     id="one-added-first"),
        pytest.param(listing(*blocks(5)), listing(*blocks(2), *blocks(3, 2)[1:]), AgentOptions(), True,
                     id="one-removed"),
        pytest.param(listing(*blocks(5)), listing(*blocks(2), "10.200.0.0/16", *blocks(3, 2)), AgentOptions(),
                     True, id="one-inserted-in-the-middle"),
        pytest.param(listing(*blocks(30)), listing(*blocks(30, 5)), AgentOptions(), True,
                     id="five-replaced-at-both-ends"),
        pytest.param(None, "masqLinkLocal: true\n", AgentOptions(), True, id="link-local-masqueraded"),
        pytest.param(listing(*blocks(3)), listing(*blocks(3)), TO_PORTS, True, id="to-ports-rules-changed"),
        pytest.param(listing("10.0.0.0/8", "fd00::/8"), listing("10.0.0.0/8", "fd00::/8", "::ffff:192.0.2.0/120"),
                     IPV6, True, id="ipv6-embedded-ipv4-added"),
        pytest.param(listing(*blocks(3)), listing(*reversed(blocks(3))), AgentOptions(), False,
                     id="reordered-is-rewritten"),
        pytest.param(listing(*blocks(3)), listing(*blocks(3), blocks(3)[0]), AgentOptions(), True,
                     id="a-cidr-listed-twice-is-inserted-again"),
        pytest.param(listing(*blocks(3), blocks(3)[0]), listing(*blocks(3)), AgentOptions(), False,
                     id="a-rule-in-the-chain-twice-is-not-deleted-by-text"),
        pytest.param(listing(*blocks(MAX_EDIT_DELETES + 1)), listing(*blocks(MAX_EDIT_DELETES + 1, 100)),
                     AgentOptions(), False, id="more-deletions-than-an-edit-makes"),
        pytest.param(listing("10.0.0.0/8"), listing("10.0.0.0/8", *blocks(MAX_EDIT_LINES + 1, 300)), AgentOptions(), False,
                     id="more-lines-than-an-edit-makes"),
    ],
)
async def test_an_edit_leaves_the_chain_a_whole_rewrite_leaves(before, after, options, edited):
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    first_options = AgentOptions(enable_ipv6=options.enable_ipv6)  # the to-ports case: ports added now
    await backend.sync(ruleset_for(before, first_options))
    written = len(kernel.restores)

    result = await backend.sync(ruleset_for(after, options))
    assert result.changed
    scripts = [text for _, text in kernel.restores[written:]]
    assert [is_edit(text) for text in scripts] == [edited]
    families = (4, 6) if options.enable_ipv6 else (4,)
    for family in families:
        assert kernel.chain(family) == await whole_chain(after, options, family)
        assert kernel.jump_count(family) == 1
    assert not (await backend.sync(ruleset_for(after, options))).changed


async def test_an_edit_of_one_family_leaves_the_other_unwritten():
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing("10.0.0.0/8", "fd00::/8"), IPV6))
    written = len(kernel.restores)
    result = await backend.sync(ruleset_for(listing("10.0.0.0/8", "fd00::/8", "2001:db8::/32"), IPV6))
    assert result.written == ("ipv6",)
    assert [family for family, _ in kernel.restores[written:]] == [6]


POOL = blocks(24)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(st.sampled_from(POOL), max_size=12), after=st.lists(st.sampled_from(POOL), max_size=12))
async def test_any_change_ends_with_the_chain_a_first_write_gives(before, after):
    """Whatever the change (duplicates included: upstream writes a CIDR listed twice twice), the
    chain ends as a first write leaves it, whether it was edited or rewritten."""
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing(*before)))
    await backend.sync(ruleset_for(listing(*after)))
    assert kernel.chain() == await whole_chain(listing(*after))
    assert kernel.jump_count(4) == 1


# --- what the backend does not know is rewritten whole, and read back at once -------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda kernel: kernel.chain().insert(0, f"-A {CHAIN} -j RETURN"), id="foreign-rule-inserted"),
        pytest.param(lambda kernel: kernel.chain().pop(2), id="rule-deleted"),
        pytest.param(lambda kernel: kernel.chains[4]["POSTROUTING"].remove(JUMP), id="jump-deleted"),
        pytest.param(lambda kernel: kernel.chains[4]["POSTROUTING"].append(JUMP), id="jump-duplicated"),
        pytest.param(lambda kernel: kernel.chains[4].pop(CHAIN), id="chain-deleted"),
    ],
)
async def test_a_config_edit_after_a_foreign_change_rewrites_the_whole_chain(damage):
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing(*blocks(4))))
    damage(kernel)
    kernel.calls.clear()
    edited = listing(*blocks(5))
    assert (await backend.sync(ruleset_for(edited))).written == ("ipv4",)
    assert not is_edit(kernel.restores[-1][1])
    assert kernel.calls == [("save", 4), ("restore", 4), ("save", 4)]  # read back, written, checked
    assert kernel.chain() == await whole_chain(edited)
    assert kernel.jump_count(4) == 1


async def test_a_backend_edits_a_chain_it_read_back_in_sync_but_rewrites_one_it_never_saw():
    kernel = FakeNatKernel()
    await IptablesBackend(kernel).sync(ruleset_for(listing(*blocks(4))))

    unseen = IptablesBackend(kernel)  # a new process (run --once), first sync a change
    await unseen.sync(ruleset_for(listing(*blocks(5))))
    assert not is_edit(kernel.restores[-1][1])

    restarted = IptablesBackend(kernel)  # a restarted daemon: the first pass finds the kernel in sync
    assert not (await restarted.sync(ruleset_for(listing(*blocks(5))))).changed
    await restarted.sync(ruleset_for(listing(*blocks(6))))
    assert is_edit(kernel.restores[-1][1])
    assert kernel.chain() == await whole_chain(listing(*blocks(6)))


async def test_after_cleanup_the_next_sync_writes_the_whole_chain():
    kernel = FakeNatKernel()
    backend = IptablesBackend(kernel)
    ruleset = ruleset_for(listing(*blocks(3)))
    await backend.sync(ruleset)
    assert await backend.cleanup(CHAIN) == ("ipv4 chain IP-MASQ-AGENT", "ipv4 jump")
    assert CHAIN not in kernel.chains[4]
    await backend.sync(ruleset_for(listing(*blocks(4))))
    assert not is_edit(kernel.restores[-1][1])
    assert kernel.chain() == await whole_chain(listing(*blocks(4)))


class ChangedAfterReadBack(FakeNatKernel):
    """Another writer deletes ``rule`` from masqd's chain right after the ``at``-th read-back."""

    def __init__(self, rule: str, at: int):
        super().__init__()
        self.rule, self.at = rule, at

    async def save(self, family: int) -> str:
        text = await super().save(family)
        if self.calls.count(("save", family)) == self.at:
            self.chain(family).remove(self.rule)
        return text


async def test_an_edit_refused_because_the_chain_changed_meanwhile_becomes_a_whole_rewrite():
    gone = f"-A {CHAIN} -d 10.0.1.0/24 {NONMASQ}"
    kernel = ChangedAfterReadBack(gone, at=3)  # 1: first sync, 2: its check, 3: the edit's read-back
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing(*blocks(3))))
    edited = listing(blocks(3)[0], blocks(3)[2], "192.168.0.0/16")  # deletes the rule the other writer took
    result = await backend.sync(ruleset_for(edited))
    assert result.written == ("ipv4",)
    refused, rewrite = (text for _, text in kernel.restores[1:])
    assert is_edit(refused) and not is_edit(rewrite)
    assert kernel.calls[-5:] == [("save", 4), ("restore", 4), ("save", 4), ("restore", 4), ("save", 4)]
    assert kernel.chain() == await whole_chain(edited)


class LockHeldOnce(FakeNatKernel):
    """The first edit fails as a held xtables lock fails a restore: no input line named."""

    failed = False

    async def restore(self, family: int, text: str) -> None:
        if is_edit(text) and not self.failed:
            self.failed = True
            self.calls.append(("restore", family))
            raise ApplyError(RESTORE, 4, "Another app is currently holding the xtables lock.")
        await super().restore(family, text)


async def test_an_edit_failing_for_another_reason_is_an_error_and_the_next_sync_rewrites():
    kernel = LockHeldOnce()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing(*blocks(3))))
    edited = ruleset_for(listing(*blocks(4)))
    with pytest.raises(ApplyError, match="xtables lock"):
        await backend.sync(edited)
    assert kernel.chain() == await whole_chain(listing(*blocks(3)))  # nothing of it applied
    await backend.sync(edited)  # the retry: the outcome of the failed write is not assumed
    assert not is_edit(kernel.restores[-1][1])
    assert kernel.chain() == await whole_chain(listing(*blocks(4)))


class StoresRulesDifferently(FakeNatKernel):
    """A kernel/iptables pair that prints a rule back in another form than masqd rendered it."""

    async def save(self, family: int) -> str:
        return (await super().save(family)).replace("-d 10.0.0.0/8 ", "-d 10.0.0.0/255.0.0.0 ")


async def test_rules_read_back_differently_after_a_write_are_an_error_not_a_loop():
    kernel = StoresRulesDifferently()
    with pytest.raises(BackendError, match="reads them back differently") as caught:
        await IptablesBackend(kernel).sync(ruleset_for(None, AgentOptions()))
    assert "10.0.0.0/255.0.0.0" in str(caught.value)
    assert len(kernel.restores) == 1  # written once, then verified, not rewritten in a loop


async def test_an_edit_read_back_differently_is_rewritten_whole_by_the_next_sync_and_reported():
    kernel = StoresRulesDifferently()
    backend = IptablesBackend(kernel)
    await backend.sync(ruleset_for(listing("192.168.0.0/16")))
    edited = ruleset_for(listing("192.168.0.0/16", "10.0.0.0/8"))
    assert (await backend.sync(edited)).written == ("ipv4",)  # the edit: checked by the next read-back
    for _ in range(2):
        with pytest.raises(BackendError, match="reads them back differently"):
            await backend.sync(edited)
    assert [is_edit(text) for _, text in kernel.restores] == [False, True, False, False]


class Ipv6SaveFails(FakeNatKernel):
    """ip6tables-save fails, as on a node whose kernel has no IPv6 nat table."""

    async def save(self, family: int) -> str:
        if family == 6:
            raise ReadBackError(["ip6tables-save", "-t", "nat"], "can't initialize ip6tables table `nat'")
        return await super().save(family)


async def test_a_failure_after_writing_one_family_says_what_was_written():
    kernel = Ipv6SaveFails()
    backend = IptablesBackend(kernel)
    with pytest.raises(BackendError) as caught:
        await backend.sync(ruleset_for(None, AgentOptions(enable_ipv6=True)))
    assert caught.value.written == ("ipv4",)  # the reconciler reports IPv4 as changed, IPv6 as kept
    assert [family for family, _ in kernel.restores] == [4]


# --- the pure parts: plan_edit and RenderedRules -------------------------------------------------------


def rule(cidr: str) -> str:
    return f"-A {CHAIN} -d {cidr} {NONMASQ}"


MASQ_LINE = f'-A {CHAIN} -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE'


@pytest.mark.parametrize(
    ("current", "desired", "script"),
    [
        pytest.param((rule("10.0.0.0/8"), MASQ_LINE), (rule("10.0.0.0/8"), rule("192.0.2.0/24"), MASQ_LINE),
                     f"*nat\n-I {CHAIN} 2 -d 192.0.2.0/24 {NONMASQ}\nCOMMIT\n", id="insert"),
        pytest.param((rule("10.0.0.0/8"), rule("192.0.2.0/24"), MASQ_LINE), (rule("10.0.0.0/8"), MASQ_LINE),
                     f"*nat\n-D {CHAIN} -d 192.0.2.0/24 {NONMASQ}\nCOMMIT\n", id="delete"),
        pytest.param((rule("10.0.0.0/8"), MASQ_LINE), (rule("192.0.2.0/24"), rule("10.0.0.0/8"), rule("198.51.100.0/24"), MASQ_LINE),
                     f"*nat\n-I {CHAIN} 1 -d 192.0.2.0/24 {NONMASQ}\n-I {CHAIN} 3 -d 198.51.100.0/24 {NONMASQ}\nCOMMIT\n",
                     id="inserts-lowest-position-first"),
        pytest.param((rule("10.0.0.0/8"), MASQ_LINE), (rule("10.0.0.0/8"), MASQ_LINE + " --random-fully"),
                     f"*nat\n-D{MASQ_LINE[2:]}\n-I {CHAIN} 2{MASQ_LINE[len('-A ' + CHAIN):]} --random-fully\nCOMMIT\n",
                     id="final-rule-replaced"),
        pytest.param((rule("10.0.0.0/8"), MASQ_LINE), (rule("10.0.0.0/8"), MASQ_LINE), None, id="nothing-differs"),
        pytest.param((rule("10.0.0.0/8"), rule("192.0.2.0/24"), MASQ_LINE),
                     (rule("192.0.2.0/24"), rule("10.0.0.0/8"), MASQ_LINE), None, id="order-changed"),
        pytest.param((rule("10.0.0.0/8"), rule("10.0.0.0/8"), MASQ_LINE), (rule("10.0.0.0/8"), MASQ_LINE), None,
                     id="a-rule-twice"),
        pytest.param((rule("10.0.0.0/8"), MASQ_LINE), ("-A OTHER -j RETURN", rule("10.0.0.0/8"), MASQ_LINE), None,
                     id="a-line-of-another-chain"),
    ],
)
def test_plan_edit(current, desired, script):
    edit = plan_edit(current, desired, CHAIN)
    assert (edit and edit.script) == script


@pytest.mark.parametrize(
    "passes",
    [
        pytest.param([(listing(*blocks(5)), AgentOptions()), (listing(*blocks(6)), AgentOptions()),
                      (listing(*blocks(3, 2)), AgentOptions())], id="lists-changing"),
        pytest.param([(listing("10.0.0.0/8", "::ffff:192.0.2.0/120", "::192.0.2.0/120", "::/0", "0.0.0.0/0"), IPV6),
                      (listing("::0.0.1.0/120", "fd00::/8", "10.0.0.0/8", "10.0.0.0/8"), IPV6)],
                     id="ipv6-forms-zero-prefix-duplicates"),
        pytest.param([(listing(*blocks(3)), AgentOptions()), (listing(*blocks(3)), AgentOptions(masq_chain="OTHER")),
                      (listing(*blocks(3)), AgentOptions())], id="chain-renamed-and-back"),
        pytest.param([(listing(*blocks(3)), AgentOptions()), (listing(*blocks(3)), AgentOptions(random_fully=False)),
                      (listing(*blocks(3)), TO_PORTS)], id="final-rules-changing"),
    ],
)
def test_rendered_rules_are_what_family_rules_renders(passes):
    rendered = RenderedRules()
    for config_text, options in passes:
        ruleset = ruleset_for(config_text, options)
        for family in ruleset.families:
            for supported in (True, False):
                assert rendered.rules(ruleset, family, supported) == family_rules(ruleset, family, supported)


def test_rendered_rules_stay_right_when_networks_come_and_go():
    rendered = RenderedRules()
    for start in range(0, 4000, 700):  # past the memo's pruning
        ruleset = ruleset_for(listing(*blocks(600, start)))
        assert rendered.rules(ruleset, ruleset.ipv4, True) == family_rules(ruleset, ruleset.ipv4, True)
