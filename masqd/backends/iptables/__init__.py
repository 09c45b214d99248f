"""The iptables backend: the upstream ip-masq-agent's rules, written with ``iptables-restore``.

One module per concern:

- :mod:`.render`: pure: the rule texts and ``iptables-restore`` input, in ``iptables-save``
  canonical form (:func:`render_ruleset`, :func:`render_removal`), what ``iptables-save`` shows
  of masqd's chain (:class:`NatState`), :func:`plan_restore`, which says what to write (nothing
  when the kernel is in sync), and the tool's version;
- :mod:`.incremental`: pure: what keeps a sync's cost proportional to the change: the chain's
  lines rendered only for networks not rendered before (:class:`RenderedRules`), and
  :func:`plan_edit`, an edit of the chain in place (a few deletions and insertions);
- :mod:`.live`: pure: read-back analysis for ``explain --live`` and the drift check: masqd's
  chain as the kernel walks it, and the rules masqd did not write that may decide;
- :mod:`.executor`: the only part that runs binaries, behind the :class:`IptablesExecutor`
  protocol, so it can be swapped (tests inject a fake, the way httpx swaps transports);
- :mod:`.backend`: :class:`IptablesBackend`, which reads back, plans, writes (an edit in place
  when it knows the chain it changes, else the whole chain) and verifies.

Which iptables variant (legacy or nft) is used is :mod:`masqd.backends.iptables_mode`'s concern.
The names below are importable from this package; each loads with its module when first used, so
the pure modules can be imported alone (see :mod:`masqd.exports`).
"""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "render": ("APPEND", "INSERT", "JUMP_COMMENT", "JUMP_PLACEMENTS", "KUBE_POSTROUTING", "MASQ_COMMENT",
               "NONMASQ_COMMENT", "RANDOM_FULLY_MIN_VERSION", "NatState", "chain_rules",
               "destination_match", "family_rules", "format_probability", "jump_rule", "parse_iptables_version",
               "parse_nat_chains", "parse_nat_state", "plan_restore", "render_removal", "render_restore",
               "render_ruleset"),
    "incremental": ("MAX_EDIT_DELETES", "MAX_EDIT_LINES", "ChainEdit", "RenderedRules", "plan_edit"),
    "live": ("live_family", "postrouting_rules"),
    "executor": ("DEFAULT_BINARIES", "LOCK_CHECK_SECONDS", "LOCK_WAIT_SECONDS", "IptablesExecutor",
                 "SubprocessExecutor", "parent_pid", "xtables_lock_path"),
    "backend": ("IptablesBackend",),
})
