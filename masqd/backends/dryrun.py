"""The dry-run backend: applies nothing, logs the rules it would apply.

It renders exactly what the iptables backend would write to an empty kernel, and treats its own
memory as "the kernel": a sync with an unchanged rule set writes (logs) nothing. The last text is
kept in ``last_rendered`` so tests and ``masqd run --backend dry-run`` users can read it.
"""

from __future__ import annotations

import structlog

from masqd.backends.conntrack import ConntrackTable
from masqd.backends.base import LiveFamily, LiveRules, SyncResult
from masqd.backends.iptables.render import APPEND, render_ruleset
from masqd.ruleset import RuleSet

log = structlog.get_logger("masqd.backend.dry-run")


class DryRunBackend:
    """Logs the iptables-restore input it would apply; touches no kernel state."""

    name = "dry-run"

    def __init__(self, conntrack: ConntrackTable | None = None, *, placement: str = APPEND) -> None:
        #: ``--postrouting-jump``: where the iptables backend would put its POSTROUTING jump.
        self.placement = placement
        #: Read-only (``ConntrackTable(read_only=True)``, as ``--backend dry-run`` has): the stale
        #: live flows an apply would delete are listed in the log, none deleted.
        self.conntrack = conntrack
        self.applied: RuleSet | None = None
        self.last_rendered: str | None = None
        self.writes = 0

    async def probe(self) -> None:
        """Nothing to learn: the dry-run backend runs no tools."""

    async def cleanup(self, chain: str) -> tuple[str, ...]:
        """Forget the rules it pretended to apply."""
        removed = ("dry-run rules",) if self.applied is not None else ()
        self.applied = None
        return removed

    def render(self, ruleset: RuleSet) -> str:
        return render_ruleset(ruleset, placement=self.placement)

    async def read_back(self, ruleset: RuleSet) -> LiveRules:
        """What this backend pretends the kernel holds (the rule set it last applied), per family
        of ``ruleset``: nothing before the first sync."""
        applied = self.applied
        families = []
        for family in ruleset.families:
            held = None if applied is None else (applied.ipv4 if family.family == 4 else applied.ipv6)
            if held is None:
                families.append(LiveFamily(family.family, present=False, drift="nothing applied"))
                continue
            reasons = [why for why, differs in (
                ("non-masquerade CIDRs differ", held.nonmasq != family.nonmasq),
                ("source rules differ", (held.keep_sources, held.masq_sources) != (family.keep_sources, family.masq_sources)),
                ("masquerade differs", applied.masquerade != ruleset.masquerade or held.snat_to != family.snat_to
                 or applied.interfaces != ruleset.interfaces),
                ("chain name differs", applied.chain != ruleset.chain),
            ) if differs]
            families.append(LiveFamily(family.family, present=True, hooked=True, local_exempt=True,
                                       nonmasq=held.nonmasq, masquerade=held.masquerades_any,
                                       drift="; ".join(reasons) or None, keep_sources=held.keep_sources,
                                       masq_sources=held.masq_sources, interfaces=applied.interfaces,
                                       snat_to=None if held.snat_to is None else str(held.snat_to)))
        return LiveRules(self.name, "dry-run rule set", tuple(families))

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        if ruleset == self.applied:
            return SyncResult()
        self.last_rendered = self.render(ruleset)
        self.applied = ruleset
        self.writes += 1
        log.info("dry-run: would apply", backend=self.name, rules=self.last_rendered)
        labels = tuple(f.label for f in ruleset.families)
        return SyncResult(labels, tuple("dry-run" for _ in labels))
