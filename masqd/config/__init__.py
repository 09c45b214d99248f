"""The config file and the command-line options, as frozen, validated values. Pure: no I/O.

The config file is the upstream ``ip-masq-agent`` file (a ConfigMap key mounted at
``/etc/config/ip-masq-agent``), YAML or JSON, every key optional; a key that is present overrides
its default:

==========================  ===============================  =====================================
key                         value                            default
==========================  ===============================  =====================================
``nonMasqueradeCIDRs``      list of CIDR strings (IPv6 only  RFC 1918; with
                            with ``--enable-ipv6``)          ``--nomasq-all-reserved-ranges`` also
                                                             the reserved ranges
``masqLinkLocal``           bool                             false: 169.254.0.0/16 keeps the pod IP
``masqLinkLocalIPv6``       bool                             false: fe80::/10 keeps the pod IP
``resyncInterval``          Go duration (``60s``, ``5m``)    ``60s`` (at least ``100ms``)
``cidrLimit``               int                              64 (link-local not counted)
==========================  ===============================  =====================================

Modules, each importing only those above it:

- :mod:`masqd.config.flags`: command-line values, ``--masq-chain`` (:func:`validate_chain_name`)
  and ``--to-ports`` (:class:`PortRange`, :func:`parse_to_ports`).
- :mod:`masqd.config.model`: the model, :class:`AgentOptions`, :class:`MasqConfig`,
  :class:`ParsedConfig`, :func:`default_config`, the default CIDR lists and the limits; each field
  documented where it is defined.
- :mod:`masqd.config.fastparse`: the fast path of :func:`parse_config` for the shape a big file
  has (a block list of CIDRs), which gives the full YAML loader's document or declines.
- :mod:`masqd.config.parse`: :func:`parse_config`, text to :class:`ParsedConfig` or a
  :class:`~masqd.errors.ConfigError` naming every problem (the YAML/JSON loading, key matching,
  per-key parsers), and the problems other readers share (:func:`too_large_problem`,
  :func:`limit_problem`).
- :mod:`masqd.config.merge`: :func:`merge_configs`, several sources into one
  :class:`MergedConfig` that remembers where each CIDR came from (:class:`CidrOrigins`).

Go durations are :mod:`masqd.duration`. Every name below is importable from ``masqd.config``.
"""

from masqd.config.flags import PortRange, parse_to_ports, validate_chain_name
from masqd.config.merge import DEFAULTS_ORIGIN, CidrOrigins, MergedConfig, merge_configs
from masqd.config.model import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_MASQ_CHAIN,
    MAX_CONFIG_BYTES,
    MIN_RESYNC_INTERVAL_NS,
    RESERVED_CIDRS,
    RFC1918_CIDRS,
    AgentOptions,
    MasqConfig,
    ParsedConfig,
    default_config,
)
from masqd.config.parse import MAX_REPORTED_FINDINGS, limit_problem, parse_config, too_large_problem

__all__ = [
    "DEFAULTS_ORIGIN",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MASQ_CHAIN",
    "MAX_CONFIG_BYTES",
    "MAX_REPORTED_FINDINGS",
    "MIN_RESYNC_INTERVAL_NS",
    "RESERVED_CIDRS",
    "RFC1918_CIDRS",
    "AgentOptions",
    "CidrOrigins",
    "MasqConfig",
    "MergedConfig",
    "ParsedConfig",
    "PortRange",
    "default_config",
    "limit_problem",
    "merge_configs",
    "parse_config",
    "parse_to_ports",
    "too_large_problem",
    "validate_chain_name",
]
