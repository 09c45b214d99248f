"""Reading the decision model's rules back (pure): what each backend's read-back makes of the
source rules, the interface-limited finals and the SNAT target, and what it flags."""

from __future__ import annotations

import ipaddress

from masqd.backends.iptables.live import live_family as iptables_live
from masqd.backends.iptables.render import family_rules, parse_nat_state, render_ruleset
from masqd.backends.nftables.live import live_family as nft_live
from masqd.backends.nftables.render import MasqRule, ruleset_states
from masqd.config import AgentOptions, parse_config
from masqd.ruleset import compute_ruleset

CONFIG = ("nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n"
          "nonMasqueradeSourceCIDRs: [10.244.9.0/24]\nsnatToAddress: 192.0.2.10\noutputInterfaces: [eth0, ens+]\n")
OPTIONS = AgentOptions()


def ruleset():
    return compute_ruleset(parse_config(CONFIG, OPTIONS).config, OPTIONS)


def test_iptables_read_back_holds_the_source_rules_interfaces_and_snat_address():
    rules = ruleset()
    desired = family_rules(rules, rules.ipv4, True)
    save = render_ruleset(rules).replace("# iptables-restore --noflush\n", "")
    live = iptables_live(parse_nat_state(save, rules.chain), 4, desired, rules.chain)
    assert live.drift is None and live.unexpected == ()
    assert live.keep_sources == (ipaddress.ip_network("10.244.9.0/24"),)
    assert live.masq_sources == (ipaddress.ip_network("10.244.0.0/16"),)
    assert live.interfaces == ("eth0", "ens+") and live.snat_to == "192.0.2.10" and live.masquerade


def test_iptables_final_rules_rewriting_to_different_addresses_are_flagged():
    rules = ruleset()
    desired = family_rules(rules, rules.ipv4, True)
    save = render_ruleset(rules).replace("# iptables-restore --noflush\n", "")
    mixed = save.replace("-o ens+ -m comment --comment \"masqd: outbound traffic is subject to SNAT (must be last in "
                         "chain)\" -j SNAT --to-source 192.0.2.10", "-o ens+ -m comment --comment \"by hand\" -j MASQUERADE")
    live = iptables_live(parse_nat_state(mixed, rules.chain), 4, desired, rules.chain)
    assert live.drift is not None
    assert "final rules rewrite to different addresses: SNAT to 192.0.2.10, MASQUERADE" in live.unexpected


def test_nftables_read_back_holds_the_source_rules_interfaces_and_snat_address():
    [state] = ruleset_states(ruleset())
    live = nft_live(state, state)
    assert live.drift is None and live.unexpected == ()
    assert live.keep_sources == (ipaddress.ip_network("10.244.9.0/24"),)
    assert live.masq_sources == (ipaddress.ip_network("10.244.0.0/16"),)
    assert live.interfaces == ("eth0", "ens+") and live.snat_to == "192.0.2.10"


def test_nftables_final_rules_rewriting_to_different_addresses_are_flagged():
    [state] = ruleset_states(ruleset())
    rules = tuple(MasqRule(fully_random=True, interface="ens*") if isinstance(r, MasqRule) and r.interface == "ens*"
                  else r for r in state.rules)
    live = nft_live(state.__class__(state.family, state.chain, state.set_type, state.intervals, rules), state)
    assert live.drift is not None
    assert "final rules rewrite to different addresses: snat to 192.0.2.10, masquerade" in live.unexpected


def test_iptables_read_back_of_a_source_list_holding_every_address_is_in_sync():
    options = AgentOptions(enable_ipv6=True)
    text = "nonMasqueradeSourceCIDRs: ['::/0']\nmasqueradeSourceCIDRs: [0.0.0.0/0, '::/0']\n"
    rules = compute_ruleset(parse_config(text, options).config, options)
    for family, tool in ((rules.ipv4, "iptables"), (rules.ipv6, "ip6tables")):
        save = render_ruleset(rules).split(f"# {tool}-restore --noflush\n")[1].split("COMMIT")[0] + "COMMIT\n"
        live = iptables_live(parse_nat_state(save, rules.chain), family.family, family_rules(rules, family, True),
                             rules.chain)
        assert live.drift is None and live.unexpected == ()
        assert live.keep_sources == family.keep_sources and live.masq_sources is None
