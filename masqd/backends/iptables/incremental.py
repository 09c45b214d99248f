"""What keeps a sync's cost proportional to the change (pure): the chain's lines rendered only for
networks not rendered before (:class:`RenderedRules`), and an edit of the chain in place instead
of a rewrite of all of it (:func:`plan_edit`).

Rewriting a 10k-rule chain costs ``iptables-restore`` (nft variant) about as much as upstream's
whole-chain restore; a few numbered insertions and deletions by rule text cost it about one read
of the table (``iptables_edit`` in ``benchmarks/RESULTS.md``). The backend edits only from a chain
it knows line for line (what it wrote or read back in sync, read back equal just before); see
:class:`.backend.IptablesBackend`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from masqd.backends.iptables.render import family_rules
from masqd.cidrs import Network
from masqd.ruleset import FamilyRules, RuleSet

#: An edit deletes at most this many rules; more and the chain is rewritten. A deletion names the
#: rule's text (so a rule no longer there fails the whole edit, and nothing is written), which
#: costs iptables-nft a walk of the chain each.
MAX_EDIT_DELETES = 16
#: An edit has at most this many lines (deletions and insertions); more and the chain is rewritten.
MAX_EDIT_LINES = 256
#: Rendered lines kept beyond the networks of the last pass, per family, before the memo is pruned.
_MEMO_SLACK = 1024


@dataclass(frozen=True, slots=True)
class ChainEdit:
    """``iptables-restore --noflush`` input editing a chain in place, and how many rules it deletes
    and inserts."""

    script: str
    deleted: int
    inserted: int


def plan_edit(current: tuple[str, ...], desired: tuple[str, ...], chain: str) -> ChainEdit | None:
    """The input that turns ``chain`` holding ``current`` (its ``-A`` lines, as iptables-save prints
    them) into ``desired``: the rules to go deleted by their text, then the new ones inserted at
    their numbered positions, lowest first, in one ``COMMIT`` (the kernel takes all of it or none).
    Only the stretch between the lines both share at the start and at the end is compared.
    ``None`` when an edit is not the way: nothing differs, a rule to delete is in the chain twice
    (deleting by text removes the first copy), the rules both keep are in another order or
    number, or there are more changes than :data:`MAX_EDIT_DELETES` / :data:`MAX_EDIT_LINES`."""
    if current == desired:
        return None
    start = _common_start(current, desired)
    end = _common_start(current[start:][::-1], desired[start:][::-1])
    old, new = current[start:len(current) - end], desired[start:len(desired) - end]
    have, want = set(old), set(new)
    deleted = [line for line in old if line not in want]
    if len(deleted) > MAX_EDIT_DELETES or any(current.count(line) > 1 for line in deleted):
        return None
    inserted = [(start + index, line) for index, line in enumerate(new) if line not in have]
    if len(deleted) + len(inserted) > MAX_EDIT_LINES:
        return None
    if [line for line in old if line in want] != [line for line in new if line in have]:
        return None
    head = f"-A {chain} "
    if not all(line.startswith(head) for line in (*deleted, *(line for _, line in inserted))):
        return None  # not a line of this chain
    lines = ["*nat", *("-D" + line[2:] for line in deleted)]
    # after the deletions the chain holds desired's kept rules in order: inserting desired[i] at
    # position i + 1, lowest first, puts each where desired has it
    lines += [f"-I {chain} {index + 1} {line[len(head):]}" for index, line in inserted]
    return ChainEdit("\n".join([*lines, "COMMIT"]) + "\n", len(deleted), len(inserted))


def _common_start(first: tuple[str, ...], second: tuple[str, ...]) -> int:
    """How many lines ``first`` and ``second`` share at their start."""
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


class RenderedRules:
    """:func:`.render.family_rules`, remembering each network's ``RETURN`` line: a pass renders
    only the networks no earlier pass rendered (formatting an address costs several times looking
    its line up by address and prefix length), and the result is the same tuple ``family_rules``
    returns. A network's line depends on the chain's name alone, so the memo is emptied when that
    changes."""

    def __init__(self) -> None:
        self._chain: str | None = None
        self._lines: dict[int, dict[int, str]] = {}

    def rules(self, ruleset: RuleSet, family: FamilyRules, random_fully_supported: bool) -> tuple[str, ...]:
        """The chain's ``-A`` lines for ``family`` of ``ruleset``, as ``family_rules`` renders them."""
        if ruleset.chain != self._chain:
            self._chain, self._lines = ruleset.chain, {}
        memo = self._lines.setdefault(family.family, {})
        nets = family.nonmasq
        keys = [_key(net) for net in nets]
        lines = list(map(memo.get, keys))
        unknown = [index for index, line in enumerate(lines) if line is None]
        missing = tuple(dict.fromkeys(nets[index] for index in unknown))
        # the source rules, the missing networks' lines, then the masquerade rules that end every chain
        rendered = family_rules(ruleset, dataclasses.replace(family, nonmasq=missing, keep=None), random_fully_supported)
        head = len(family.keep_sources)
        if missing:
            fresh = dict(zip(map(_key, missing), rendered[head:]))
            for index in unknown:
                lines[index] = fresh[keys[index]]
            memo.update(fresh)
            if len(memo) > 2 * len(nets) + _MEMO_SLACK:  # networks long gone: keep only today's
                self._lines[family.family] = dict(zip(keys, lines))
        return (*rendered[:head], *lines, *rendered[head + len(missing):])


def _key(net: Network) -> int:
    """What tells a family's networks apart (address and prefix length in one int), cheaper to
    make, hash and keep than the network itself."""
    return int(net.network_address) << 8 | net.prefixlen
