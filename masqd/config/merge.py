"""Merging several config sources (files, a directory, the API ConfigMap) into the one config
masqd applies, remembering which source listed each non-masquerade CIDR. Pure: no I/O.

Each source is parsed and validated on its own first (:func:`~masqd.config.parse.parse_config`);
:func:`merge_configs` combines the valid ones.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
import dataclasses
from dataclasses import dataclass

from masqd.cidrs import Network, network_key
from masqd.config.model import OTHER_CIDR_LISTS, AgentOptions, MasqConfig, default_config
from masqd.errors import ConfigError, Problem


#: The origin shown for CIDRs that come from the defaults (no present source lists any).
DEFAULTS_ORIGIN = "defaults"


class CidrOrigins(Mapping[Network, tuple[str, ...]]):
    """Each CIDR the sources list -> the names of the sources listing it, in source order; the
    CIDRs in the order first listed. A read-only mapping, built when first read: ``explain`` and
    the metrics read it, a reconcile pass does not, and a dict keyed by 100k ``ipaddress``
    networks costs a tenth of a second of hashing them (it is keyed by
    :func:`~masqd.cidrs.network_key` instead)."""

    __slots__ = ("_index", "_listing")

    def __init__(self, listing: Sequence[tuple[str, Sequence[Network]]] = ()):
        """``listing``: ``(source name, the CIDRs it lists)``, in source order."""
        self._listing = tuple(listing)
        self._index: dict[int, tuple[Network, tuple[str, ...]]] | None = None

    def _built(self) -> dict[int, tuple[Network, tuple[str, ...]]]:
        index = self._index
        if index is None:
            found: dict[int, tuple[Network, list[str]]] = {}
            for name, networks in self._listing:
                for net in networks:
                    entry = found.setdefault(network_key(net), (net, []))
                    if name not in entry[1]:
                        entry[1].append(name)
            index = self._index = {key: (net, tuple(names)) for key, (net, names) in found.items()}
        return index

    def __getitem__(self, net: object) -> tuple[str, ...]:
        try:
            return self._built()[network_key(net)][1]  # type: ignore[arg-type]
        except (KeyError, AttributeError):  # not listed, or not a network at all
            raise KeyError(net) from None

    def __iter__(self) -> Iterator[Network]:
        return (net for net, _ in self._built().values())

    def __len__(self) -> int:
        return len(self._built())

    def items(self) -> ItemsView[Network, tuple[str, ...]]:
        return _Items(self)

    def values(self) -> ValuesView[tuple[str, ...]]:
        return _Values(self)

    def __repr__(self) -> str:
        return f"CidrOrigins({dict(self.items())!r})"


class _Items(ItemsView):
    def __iter__(self):
        return iter(self._mapping._built().values())  # (network, names) pairs as they are


class _Values(ValuesView):
    def __iter__(self):
        return (names for _, names in self._mapping._built().values())


@dataclass(frozen=True, slots=True)
class MergedConfig:
    """The config masqd applies, merged from every config source present, and where each
    non-masquerade CIDR came from.

    config: the merged values (see :func:`merge_configs`).
    origins: each CIDR of ``config.non_masquerade_cidrs`` -> the sources listing it, in source
        order (``("defaults",)`` for default CIDRs): a read-only mapping (:class:`CidrOrigins`).
    sources: the names of the sources present (a missing file or ConfigMap is not present).
    """

    config: MasqConfig
    origins: Mapping[Network, tuple[str, ...]]
    sources: tuple[str, ...]
    #: The same for the other CIDR lists (``masqueradeCIDRs``, ``masqueradeSourceCIDRs``,
    #: ``nonMasqueradeSourceCIDRs``): key -> CIDR -> the sources listing it.
    list_origins: Mapping[str, Mapping[Network, tuple[str, ...]]] = dataclasses.field(default_factory=dict)


def merge_configs(parts: list[tuple[str, MasqConfig]] | tuple[tuple[str, MasqConfig], ...], options: AgentOptions) -> MergedConfig:
    """Merge the valid configs of the present sources, ``(name, config)`` in source order.

    No source present: the defaults. One source: that source's config, exactly. Several:
    ``nonMasqueradeCIDRs`` are unioned (first listing wins the order), ``masqLinkLocal`` and
    ``masqLinkLocalIPv6`` are OR'ed, the smallest ``resyncInterval`` wins, and a key no source
    sets keeps its default. ``cidrLimit`` was already checked per source by
    :func:`~masqd.config.parse.parse_config`; with several sources plugin contributions are not
    counted against any one source's limit. The other CIDR lists and ``outputInterfaces`` are
    unioned like ``nonMasqueradeCIDRs``; ``snatToAddress`` (and ``snatToAddressIPv6``) may be set
    by several sources only to the same address: two different ones raise :class:`ConfigError`
    naming both sources.
    """
    defaults = default_config(options)
    listing = [(name, c.non_masquerade_cidrs) for name, c in parts if "nonMasqueradeCIDRs" in c.keys]
    origins = CidrOrigins(listing or [(DEFAULTS_ORIGIN, defaults.non_masquerade_cidrs)])
    others = {key: CidrOrigins([(name, getattr(c, field)) for name, c in parts if key in c.keys])
              for key, field in OTHER_CIDR_LISTS.items()}
    names = tuple(name for name, _ in parts)
    if len(parts) == 1:
        return MergedConfig(parts[0][1], origins, names, others)
    if not parts:
        return MergedConfig(defaults, origins, names, others)
    resyncs = [c.resync_interval_ns for _, c in parts if "resyncInterval" in c.keys]
    config = MasqConfig(
        non_masquerade_cidrs=tuple(origins),
        masq_link_local=any(c.masq_link_local for _, c in parts),
        masq_link_local_ipv6=any(c.masq_link_local_ipv6 for _, c in parts),
        resync_interval_ns=min(resyncs) if resyncs else defaults.resync_interval_ns,
        cidr_limit=max(c.cidr_limit for _, c in parts),
        cidr_limit_set=False,
        keys=frozenset().union(*(c.keys for _, c in parts)),
        **{field: tuple(others[key]) for key, field in OTHER_CIDR_LISTS.items()},
        snat_to_address=_one_address(parts, "snatToAddress", "snat_to_address"),
        snat_to_address_ipv6=_one_address(parts, "snatToAddressIPv6", "snat_to_address_ipv6"),
        output_interfaces=tuple(dict.fromkeys(name for _, c in parts for name in c.output_interfaces)),
    )
    return MergedConfig(config, origins, names, others)


def _one_address(parts, key: str, field: str):
    """The address the sources setting ``key`` agree on (``None``: no source sets it)."""
    setting = [(name, getattr(c, field)) for name, c in parts if getattr(c, field) is not None]
    if len({address for _, address in setting}) > 1:
        (first, one), (second, two) = setting[0], next(item for item in setting if item[1] != setting[0][1])
        raise ConfigError(f"{first}, {second}", [Problem(key, f"{one}, {two}", (
            f"{first} sets {one} and {second} sets {two}: traffic can be rewritten to one address only; "
            "set it in one config source"))])
    return setting[0][1] if setting else None
