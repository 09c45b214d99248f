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
"""

from masqd.backends.nftables.backend import NftablesBackend
from masqd.backends.nftables.executor import NftExecutor, NftMonitor, NftSubprocessExecutor
from masqd.backends.nftables.live import _why, live_family, other_nat_chains, parse_listing
from masqd.backends.nftables.monitor import ChangeFilter
from masqd.backends.nftables.render import (MasqRule, TableState, desired_state, intervals_of, render_delete,
                                            render_replace, render_ruleset, render_table)

__all__ = [
    "ChangeFilter",
    "MasqRule",
    "NftExecutor",
    "NftMonitor",
    "NftSubprocessExecutor",
    "NftablesBackend",
    "TableState",
    "desired_state",
    "intervals_of",
    "live_family",
    "other_nat_chains",
    "parse_listing",
    "render_delete",
    "render_replace",
    "render_ruleset",
    "render_table",
]
