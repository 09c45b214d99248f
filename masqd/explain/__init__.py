"""``masqd explain``: what happens to traffic to an address, and why. Pure: no I/O.

For each address: whether traffic to it keeps the pod source address or is masqueraded, every
non-masquerade CIDR that matches it (most specific first) and where each came from
(:mod:`masqd.provenance`). With the rules the kernel holds (:class:`~masqd.backends.base.LiveRules`,
``--live``) the verdict is the kernel's, and every difference from the desired state is named:
per address when the kernel decides otherwise, per family for the rules themselves. Rules masqd
does not write that may act on an address (:class:`~masqd.backends.base.ForeignRule`: ahead of
masqd's chain, inside it, after it) are walked in the kernel's order: one that surely matches
decides the verdict, one that only may (other matches, a jump) makes it uncertain when it could
decide otherwise. An IPv4-mapped IPv6 address (``::ffff:10.1.1.1``) is explained as its IPv4
address: traffic to it leaves as IPv4.

The decision model beyond upstream (:mod:`masqd.ruleset`) is explained step by step, in the
order the rules take them: the interface rule (``outputInterfaces``; ``--out-interface NAME``),
the source rules (``nonMasqueradeSourceCIDRs``, ``masqueradeSourceCIDRs``; ``--from SOURCE``),
then the destination's longest matching prefix among the non-masquerade and the masquerade
entries as listed (the deciding prefix, and the shorter ones it overrides, each with its origin),
and the address traffic is rewritten to (the node's, MASQUERADE, or ``snatToAddress[IPv6]``,
SNAT). Without ``--from`` (``--out-interface``) the verdict is the one for a source (an
interface) the rules leave to the destination, and the sources (interfaces) that would keep the
pod address are listed with it. With ``--live`` the kernel's verdict follows the same steps over
what the kernel holds (:class:`~masqd.backends.base.LiveFamily`: its source rules, interfaces,
SNAT address and the flattened non-masquerade CIDRs). With none of the decision model's keys set
and neither flag given, the report is upstream's: nothing of this is added.

Modules: :mod:`.model` (the values and the argument parsers), :mod:`.verdicts` (deciding, desired
and live, and the differences), :mod:`.output` (text and JSON). Every public name is importable
from ``masqd.explain``.
"""

from masqd.explain.model import (KEEP, LOCAL_NOTE, MASQUERADE, UNCERTAIN, UNMANAGED, Address, Explanation,
                                 InterfaceRule, Match, Report, SourceRule, Verdict, parse_destination, parse_interface,
                                 parse_source, source_family_problem)
from masqd.explain.output import as_json, format_text
from masqd.explain.verdicts import explain, explain_kernel, family_differences

__all__ = ["KEEP", "LOCAL_NOTE", "MASQUERADE", "UNCERTAIN", "UNMANAGED", "Address", "Explanation", "InterfaceRule",
           "Match", "Report", "SourceRule", "Verdict", "as_json", "explain", "explain_kernel", "family_differences",
           "format_text", "parse_destination", "parse_interface", "parse_source", "source_family_problem"]
