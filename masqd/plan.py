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
    ``masquerade_cidrs``), then their vetoes heard (``validate_config``). Raises :class:`PluginError`,
    or :class:`ConfigError` when config sources alone disagree. ``merged``: the merged config ``config`` is, whose sources a conflict then names."""
    contributions: tuple[Contribution, ...] = ()
    if plugins is not None:
        contributions = await plugins.contributions(config, options)
        contributions += await plugins.contributions(config, options, masquerade=True)
    extra = tuple(net for contribution in contributions if not contribution.masquerade for net in contribution.cidrs)
    masq_extra = tuple(net for contribution in contributions if contribution.masquerade for net in contribution.cidrs)
    cidrs = nonmasq_list(config, extra)
    masq = masquerade_list(config, masq_extra)
    problems = _limits_with_plugins(config, cidrs, masq)
    conflicts, by_plugin = [], False
    if masq:  # config sources and plugins are each checked alone; here all of them together
        link_local = ((() if config.masq_link_local else (LINK_LOCAL_V4,))
                      + (() if config.masq_link_local_ipv6 else (LINK_LOCAL_V6,)))
        conflicts, by_plugin = _conflicts(cidrs + link_local, masq, contributions, merged)
    if problems or by_plugin:
        raise PluginError(problems + conflicts)
    if conflicts:  # several config sources that disagree (a file's own lists were checked when parsed)
        raise ConfigError(", ".join(merged.sources) if merged is not None and merged.sources else "config", conflicts)
    if plugins is not None:
        await plugins.validate(config, cidrs, options)
    return compute_ruleset(config, options, extra, listed=cidrs, masq_extra=masq_extra), contributions


def _limits_with_plugins(config: MasqConfig, cidrs: tuple, masq: tuple) -> list[Problem]:
    """With plugin CIDRs, ``cidrLimit`` holds for each list (kept, masqueraded) only when the file
    sets it (see MasqConfig); the file's own lists were checked when it was parsed."""
    if not config.cidr_limit_set:
        return []
    return [limit_problem(key, config.cidr_limit, f"{len(listed)} CIDRs ({len(own)} from the file, "
                                                  f"{len(listed) - len(own)} from plugins)",
                          "raise cidrLimit or contribute fewer CIDRs")
            for key, listed, own in (("nonMasqueradeCIDRs", cidrs, config.non_masquerade_cidrs),
                                     ("masqueradeCIDRs", masq, config.masquerade_cidrs))
            if len(listed) > config.cidr_limit]


def _conflicts(kept: tuple, masq: tuple, contributions: tuple[Contribution, ...],
               merged: MergedConfig | None) -> tuple[list[Problem], bool]:
    """Across every config source, the defaults, the link-local entries and every plugin: each
    masquerade entry also kept with the same prefix, as a problem naming both places; and whether
    a plugin is one of them."""
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

    problems = [Problem("masqueradeCIDRs", cidr_text(net), f"masqueraded by {', '.join(places(net, True))} and kept by "
                                                           f"{', '.join(places(net, False))}: a destination is either "
                                                           "kept or masqueraded")
                for net in masq if network_key(net) in keys]
    return problems, by_plugin
