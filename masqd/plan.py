"""The desired rules of one pass (:func:`plan_rules`): a valid config, the plugins' contributions
(kept and masquerade entries) and their vetoes, checked together. Reads nothing but what the
plugins return; the reconciler (:mod:`masqd.reconcile`) calls it on every pass, and the one-shot
commands (``validate``, ``render``, ``explain``) to show what a pass would apply.
"""

from __future__ import annotations

from masqd.cidrs import LINK_LOCAL_V4, LINK_LOCAL_V6, cidr_text, network_key
from masqd.config import DEFAULTS_ORIGIN, AgentOptions, MasqConfig, MergedConfig, limit_problem
from masqd.errors import ConfigError, PluginError, Problem
from masqd.plugins import Contribution, Plugins
from masqd.ruleset import RuleSet, compute_ruleset, masquerade_list, nonmasq_list


async def plan_rules(config: MasqConfig, options: AgentOptions, plugins: Plugins | None,
                     merged: MergedConfig | None = None) -> tuple[RuleSet, tuple[Contribution, ...]]:
    """The desired rules for a valid config: the plugins' CIDRs added (``nonmasq_cidrs``,
    ``masquerade_cidrs``), then their vetoes heard (``validate_config``). Raises :class:`PluginError`.
    ``merged``: the merged config ``config`` is, whose sources a conflict then names."""
    contributions: tuple[Contribution, ...] = ()
    if plugins is not None:
        contributions = await plugins.contributions(config, options)
        contributions += await plugins.contributions(config, options, masquerade=True)
    extra = tuple(net for contribution in contributions if not contribution.masquerade for net in contribution.cidrs)
    masq_extra = tuple(net for contribution in contributions if contribution.masquerade for net in contribution.cidrs)
    cidrs = nonmasq_list(config, extra)
    if extra:
        _check_limit_with_plugins(config, cidrs)
    masq = masquerade_list(config, masq_extra)
    if masq:  # config sources and plugins are each checked alone; here all of them together
        link_local = ((() if config.masq_link_local else (LINK_LOCAL_V4,))
                      + (() if config.masq_link_local_ipv6 else (LINK_LOCAL_V6,)))
        _check_overrides(config, cidrs + link_local, masq, contributions, merged)
    if plugins is not None:
        await plugins.validate(config, cidrs, options)
    return compute_ruleset(config, options, extra, listed=cidrs, masq_extra=masq_extra), contributions


def _check_limit_with_plugins(config: MasqConfig, cidrs: tuple) -> None:
    """With plugin CIDRs, ``cidrLimit`` holds only when the file sets it (see MasqConfig)."""
    if not config.cidr_limit_set:
        return
    count = len(cidrs)
    if count > config.cidr_limit:
        from_file = len(config.non_masquerade_cidrs)
        raise PluginError([limit_problem("nonMasqueradeCIDRs", config.cidr_limit,
                                         f"{count} CIDRs ({from_file} from the file, {count - from_file} from plugins)",
                                         "raise cidrLimit or contribute fewer CIDRs")])


def _check_overrides(config: MasqConfig, kept: tuple, masq: tuple, contributions: tuple[Contribution, ...],
                     merged: MergedConfig | None) -> None:
    """Across every config source, the defaults, the link-local entries and every plugin: no
    masquerade entry may be kept with the same prefix, and (when the file sets ``cidrLimit``)
    plugins' masquerade entries count toward it. Raises :class:`PluginError` naming both places
    when a plugin is one of them, else :class:`ConfigError` (several config sources that
    disagree; a file's own lists were checked when it was parsed)."""
    problems = []
    if config.cidr_limit_set and len(masq) > max(config.cidr_limit, len(config.masquerade_cidrs)):
        from_file = len(config.masquerade_cidrs)
        problems.append(limit_problem("masqueradeCIDRs", config.cidr_limit,
                                      f"{len(masq)} CIDRs ({from_file} from the file, {len(masq) - from_file} from plugins)",
                                      "raise cidrLimit or contribute fewer CIDRs"))
    keys = {network_key(net) for net in masq}.intersection(map(network_key, kept))  # one pass over kept
    by_plugin = False

    def places(net, masquerade: bool) -> list[str]:
        nonlocal by_plugin
        found = [f"plugin {c.plugin}" for c in contributions if c.masquerade is masquerade and net in c.cidrs]
        by_plugin = by_plugin or bool(found)
        if merged is not None:
            origins = merged.list_origins.get("masqueradeCIDRs", {}) if masquerade else merged.origins
            found = ["the default nonMasqueradeCIDRs" if name == DEFAULTS_ORIGIN and name not in merged.sources
                     else f"{name} ({'masqueradeCIDRs' if masquerade else 'nonMasqueradeCIDRs'})"
                     for name in origins.get(net, ())] + found
        if not masquerade and net in (LINK_LOCAL_V4, LINK_LOCAL_V6):
            key = "masqLinkLocal" if net.version == 4 else "masqLinkLocalIPv6"
            found.append(f"the link-local default ({key}: false; set {key}: true to masquerade it)")
        return found or ["the config"]

    for net in masq:
        if network_key(net) in keys:
            problems.append(Problem("masqueradeCIDRs", cidr_text(net),
                                    f"masqueraded by {', '.join(places(net, True))} and kept by "
                                    f"{', '.join(places(net, False))}: a destination is either kept or masqueraded"))
    if problems and (by_plugin or len(problems) > len(keys)):
        raise PluginError(problems)
    if problems:
        raise ConfigError(", ".join(merged.sources) if merged is not None and merged.sources else "config", problems)
