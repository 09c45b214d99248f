"""The nftables backend: native interval sets, one atomic transaction per apply.

Per family masqd owns one table (``ip masqd``, and ``ip6 masqd`` with IPv6) holding a set of the
non-masquerade destinations and a ``nat`` chain hooked at postrouting; :mod:`.render` shows its
rules. Rendering and reading back are pure: :func:`render_replace` writes the nft transaction and
:func:`parse_listing` turns ``nft --json list table`` output into the same :class:`TableState`
model that :func:`desired_state` builds, so drift detection is a comparison of two values.

One module per concern:

- :mod:`.render`: the model (:class:`MasqRule`, :class:`TableState`, :func:`desired_state`)
  and the nft scripts (:func:`render_table`, :func:`render_replace`, :func:`render_delete`);
- :mod:`.live`: ``nft --json`` listings into the model (:func:`parse_listing`), and what the
  kernel does with traffic (:func:`live_family`, :func:`other_nat_chains`);
- :mod:`.monitor`: :class:`ChangeFilter`, the pure reader of ``nft monitor`` output;
- :mod:`.executor`: the exec seam (:class:`NftExecutor`, :class:`NftMonitor`,
  :class:`NftSubprocessExecutor`), the only part that runs ``nft``;
- :mod:`.backend`: :class:`NftablesBackend`, which reads back, writes, verifies and monitors.

:class:`masqd.testing.fake_nft.FakeNft` is an in-memory nft for tests, tracking table contents.
The names below are importable from this package; each loads with its module when first used, so
the pure modules can be imported alone (see :mod:`masqd.exports`).
"""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "render": ("CHAIN", "CHAIN_COMMENT", "DEFAULT_PRIORITY", "LOCAL_RETURN", "NFT_FAMILY", "SET_COMMENT",
               "SRCNAT_PRIORITY", "TABLE", "TABLE_COMMENT", "MasqRule", "TableState", "desired_state", "intervals_of",
               "parse_priority", "priority_text", "render_delete", "render_replace", "render_ruleset", "render_table",
               "set_name", "set_return"),
    "live": ("live_family", "other_nat_chains", "parse_listing", "why_rewritten"),
    "monitor": ("ChangeFilter",),
    "executor": ("NftExecutor", "NftMonitor", "NftSubprocessExecutor", "load_error", "marker_lines"),
    "backend": ("NftablesBackend",),
})
