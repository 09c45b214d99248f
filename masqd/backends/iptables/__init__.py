"""The iptables backend: the upstream ip-masq-agent's rules, written with ``iptables-restore``.

One module per concern:

- :mod:`.render`: pure: the rule texts and ``iptables-restore`` input, in ``iptables-save``
  canonical form, what ``iptables-save`` shows of masqd's chain (:class:`NatState`), and
  :func:`plan_restore`, which says what to write (nothing when the kernel is in sync);
- :mod:`.live`: pure: read-back analysis for ``explain --live`` and the drift check: masqd's
  chain as the kernel walks it, and the rules masqd did not write that may decide;
- :mod:`.executor`: the only part that runs binaries, behind the :class:`IptablesExecutor`
  protocol, so it can be swapped (tests inject a fake, the way httpx swaps transports);
- :mod:`.backend`: :class:`IptablesBackend`, which reads back, plans, writes and verifies.

Which iptables variant (legacy or nft) is used is :mod:`masqd.backends.iptables_mode`'s concern.
"""

from masqd.backends.iptables.backend import IptablesBackend, render_ruleset
from masqd.backends.iptables.executor import LOCK_WAIT_SECONDS, IptablesExecutor, SubprocessExecutor
from masqd.backends.iptables.live import live_family
from masqd.backends.iptables.render import (JUMP_COMMENT, NatState, destination_match, format_probability, jump_rule,
                                            parse_nat_chains, parse_nat_state, plan_restore, render_restore)
from masqd.backends.iptables_mode import Binaries

__all__ = [
    "JUMP_COMMENT",
    "LOCK_WAIT_SECONDS",
    "Binaries",
    "IptablesBackend",
    "IptablesExecutor",
    "NatState",
    "SubprocessExecutor",
    "destination_match",
    "format_probability",
    "jump_rule",
    "live_family",
    "parse_nat_chains",
    "parse_nat_state",
    "plan_restore",
    "render_restore",
    "render_ruleset",
]
