"""Merging several config sources (files, a directory, the API ConfigMap) into the one config
masqd applies, remembering which source listed each non-masquerade CIDR. Pure: no I/O.

Each source is parsed and validated on its own first (:func:`~masqd.config.parse.parse_config`);
:func:`merge_configs` combines the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from masqd.cidrs import Network
from masqd.config.model import AgentOptions, MasqConfig, default_config

#: The origin shown for CIDRs that come from the defaults (no present source lists any).
DEFAULTS_ORIGIN = "defaults"


@dataclass(frozen=True, slots=True)
class MergedConfig:
    """The config masqd applies, merged from every config source present, and where each
    non-masquerade CIDR came from.

    config: the merged values (see :func:`merge_configs`).
    origins: each CIDR of ``config.non_masquerade_cidrs`` -> the sources listing it, in source
        order (``("defaults",)`` for default CIDRs).
    sources: the names of the sources present (a missing file or ConfigMap is not present).
    """

    config: MasqConfig
    origins: dict[Network, tuple[str, ...]]
    sources: tuple[str, ...]


def merge_configs(parts: list[tuple[str, MasqConfig]] | tuple[tuple[str, MasqConfig], ...], options: AgentOptions) -> MergedConfig:
    """Merge the valid configs of the present sources, ``(name, config)`` in source order.

    No source present: the defaults. One source: that source's config, exactly. Several:
    ``nonMasqueradeCIDRs`` are unioned (first listing wins the order), ``masqLinkLocal`` and
    ``masqLinkLocalIPv6`` are OR'ed, the smallest ``resyncInterval`` wins, and a key no source
    sets keeps its default. ``cidrLimit`` was already checked per source by
    :func:`~masqd.config.parse.parse_config`; with several sources plugin contributions are not
    counted against any one source's limit.
    """
    defaults = default_config(options)
    listing = [(name, c) for name, c in parts if "nonMasqueradeCIDRs" in c.keys]
    origins: dict[Network, list[str]] = {}
    for name, config in listing:
        for net in config.non_masquerade_cidrs:
            names = origins.setdefault(net, [])
            if name not in names:
                names.append(name)
    if not listing:
        origins = {net: [DEFAULTS_ORIGIN] for net in defaults.non_masquerade_cidrs}
    merged_origins = {net: tuple(names) for net, names in origins.items()}
    names = tuple(name for name, _ in parts)
    if len(parts) == 1:
        return MergedConfig(parts[0][1], merged_origins, names)
    if not parts:
        return MergedConfig(defaults, merged_origins, names)
    resyncs = [c.resync_interval_ns for _, c in parts if "resyncInterval" in c.keys]
    config = MasqConfig(
        non_masquerade_cidrs=tuple(origins),
        masq_link_local=any(c.masq_link_local for _, c in parts),
        masq_link_local_ipv6=any(c.masq_link_local_ipv6 for _, c in parts),
        resync_interval_ns=min(resyncs) if resyncs else defaults.resync_interval_ns,
        cidr_limit=max(c.cidr_limit for _, c in parts),
        cidr_limit_set=False,
        keys=frozenset().union(*(c.keys for _, c in parts)),
    )
    return MergedConfig(config, merged_origins, names)
