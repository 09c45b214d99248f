"""Regenerate the ``listing_*.json`` fixtures: what ``nft --json list table`` prints for a table.

Each fixture is the raw output of nft (1.0.6 when they were captured) after loading a script into
a throw-away network namespace, optionally followed by hand edits (the ``drift_*`` ones). Run as
root from the repository root::

    .venv/bin/python tests/golden/nftables/capture_listings.py

The namespace is deleted again whatever happens. Nothing here runs during the tests: they read
the stored JSON, so ``tests/test_render_nftables.py`` stays pure.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from masqd.backends.nftables import NftablesBackend
from masqd.config import AgentOptions, parse_config
from masqd.ruleset import compute_ruleset

HERE = Path(__file__).parent


def golden(name: str) -> str:
    return (HERE / f"{name}.txt").read_text()


def rendered(config: str, ipv6: bool = False) -> str:
    options = AgentOptions(enable_ipv6=ipv6)
    return NftablesBackend().render(compute_ruleset(parse_config(config, options).config, options))


#: name -> (script loaded, nft commands run afterwards, families listed)
CAPTURES = {
    "defaults": (golden("defaults"), [], ("ip",)),
    "ipv6": (golden("ipv6"), [], ("ip", "ip6")),
    "masq_link_local": (golden("masq_link_local"), [], ("ip",)),
    "to_ports_two_ranges": (golden("to_ports_two_ranges"), [], ("ip",)),
    "to_ports_two_ranges_no_random_fully": (golden("to_ports_two_ranges_no_random_fully"), [], ("ip",)),
    "to_ports_single_port": (golden("to_ports_single_port"), [], ("ip",)),
    "everything": (rendered('nonMasqueradeCIDRs: [0.0.0.0/0, "::/0"]\n', ipv6=True), [], ("ip", "ip6")),
    "merged": (rendered("nonMasqueradeCIDRs: [11.0.0.0/8, 12.0.0.0/8, 192.0.2.1/32, 192.0.2.2/32, 192.0.2.3/32, "
                        "10.1.0.0/16, 10.0.0.0/8]\nmasqLinkLocal: true\n"), [], ("ip",)),
    "mapped": (rendered('nonMasqueradeCIDRs: ["::ffff:192.0.2.0/120", "::ffff:192.0.3.0/120", "::192.0.2.0/120", '
                        '"2001:db8::1/128"]\nmasqLinkLocalIPv6: true\n', ipv6=True), [], ("ip6",)),
    # drift: what the kernel shows after someone else changed masqd's defaults table
    "drift_element_deleted": (golden("defaults"), ["delete element ip masqd nonmasq4 { 172.16.0.0/12 }"], ("ip",)),
    "drift_range_element_added": (golden("defaults"), ["add element ip masqd nonmasq4 { 192.0.2.5-192.0.2.9 }"], ("ip",)),
    "drift_foreign_rule_inserted": (golden("defaults"), ["insert rule ip masqd nat ip saddr 10.244.9.0/24 accept"], ("ip",)),
    "drift_counter_rule_added": (golden("defaults"), ["add rule ip masqd nat counter"], ("ip",)),
    "drift_policy_drop": (golden("defaults"), ["chain ip masqd nat { policy drop ; }"], ("ip",)),
    "drift_chain_priority": (golden("defaults").replace("priority srcnat + 10;", "priority srcnat - 1;"), [], ("ip",)),
    "drift_set_flushed": (golden("defaults"), ["flush set ip masqd nonmasq4"], ("ip",)),
    "drift_chain_flushed": (golden("defaults"), ["flush chain ip masqd nat"], ("ip",)),
    "drift_table_dormant": (golden("defaults"), ["add table ip masqd { flags dormant ; }"], ("ip",)),
    "drift_extra_chain": (golden("defaults"), [
        "add chain ip masqd sneaky { type nat hook postrouting priority srcnat - 1 ; }",
        "add rule ip masqd sneaky masquerade",
    ], ("ip",)),
}


def main() -> None:
    ns = f"mq-{secrets.token_hex(3)}-capture"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for name, (script, edits, families) in CAPTURES.items():
            nft = ["ip", "netns", "exec", ns, "nft"]
            subprocess.run([*nft, "flush", "ruleset"], check=True)
            subprocess.run([*nft, "-f", "-"], input=script, text=True, check=True)
            for edit in edits:
                subprocess.run([*nft, edit], check=True)
            for family in families:
                listing = subprocess.run([*nft, "--json", "list", "table", family, "masqd"],
                                         capture_output=True, text=True, check=True).stdout
                (HERE / f"listing_{name}_{family}.json").write_text(listing)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


if __name__ == "__main__":
    main()
