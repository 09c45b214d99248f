"""``masqd explain ADDRESS... [--from SOURCE] [--out-interface NAME]``: whether traffic to each
address keeps the pod address or is masqueraded, and why (the interface and source rules, the
deciding prefix and where it came from, the address traffic is rewritten to); with ``--live``,
from the rules the kernel holds too."""

from __future__ import annotations

import argparse
import json
import sys

from masqd.agent import Agent
from masqd.cli.common import (EXIT_BACKEND, EXIT_DRIFT, EXIT_INVALID_CONFIG, EXIT_OK, EXIT_USAGE, agent_from,
                               plan_and_report)
from masqd.config import parse_config
from masqd.errors import BackendError, BackendUnsupported
from masqd.explain import as_json, explain, explain_kernel, format_text, source_family_problem
from masqd.plugins import Plugins
from masqd.provenance import decision_origins
from masqd.ruleset import compute_ruleset


async def explain_command(args: argparse.Namespace, plugins: Plugins) -> int:
    """Each address against the desired state (with ``--live``, the kernel's rules too)."""
    source, interface = getattr(args, "source", None), getattr(args, "out_interface", None)
    if source is not None and (problem := source_family_problem(source, args.addresses)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    agent = agent_from(args, plugins, once=True, uses_backend=args.live, leftovers=_other_backends)
    planned = await plan_and_report(agent)
    if planned is None:
        # with --live, the kernel still holds the last good rules: explain from them alone
        return await _explain_kernel_only(args, agent) if args.live else EXIT_INVALID_CONFIG
    loaded, ruleset, contributions = planned
    descriptions, problems = await plugins.describe_cidrs(contributions)
    for problem in problems:
        print(f"warning: plugin {problem}; its CIDRs are shown without that detail", file=sys.stderr)
    origins = decision_origins(ruleset, loaded.merged, contributions, agent.options, agent.loader.texts(),
                               descriptions=descriptions)
    live = None
    if args.live:
        live = await _read_back(agent, ruleset)
        if live is None:
            return EXIT_BACKEND
        if not any(family.present for family in live.families):
            for what, flags in await agent.reconciler.rules_of_other_backends(ruleset):
                print(f"note: the kernel holds none of the {agent.backend.name} backend's rules, but masqd's rules of "
                      f"the {what}: explain them with {flags}", file=sys.stderr)
    config = loaded.config
    report = explain(args.addresses, ruleset, origins, live, masq_link_local=config.masq_link_local,
                     masq_link_local_ipv6=config.masq_link_local_ipv6, source=source, interface=interface)
    _print_report(report, args.output)
    return EXIT_DRIFT if report.drift else EXIT_OK


def _other_backends(active):
    """The backends whose rules ``--live`` looks for when the chosen one holds none (loaded only then)."""
    from masqd.backends.leftovers import leftover_backends

    return leftover_backends(active)


def _print_report(report, output: str) -> None:
    """An explain report on stdout: ``text`` or ``json`` (a list of objects)."""
    sys.stdout.write(json.dumps(as_json(report), indent=2) + "\n" if output == "json" else format_text(report))


async def _read_back(agent: Agent, ruleset):
    """What the kernel holds of ``ruleset``'s rules, through the reconciler (the one caller of
    backends); ``None`` after printing why the kernel could not be read. A backend that cannot
    read back raises :class:`~masqd.errors.BackendUnsupported`, a usage error (exit 2)."""
    try:
        return await agent.reconciler.read_back(ruleset)
    except BackendUnsupported:
        raise
    except BackendError as exc:
        print(f"error: {agent.backend.name}: {exc}", file=sys.stderr)
        return None


async def _explain_kernel_only(args: argparse.Namespace, agent: Agent) -> int:
    """``explain --live`` with an invalid config (its problems already printed): each address from
    the rules the kernel holds alone; exits 1 all the same."""
    # only which families and which chain to read come from this: the flags decide both
    shape = compute_ruleset(parse_config(None, agent.options).config, agent.options)
    live = await _read_back(agent, shape)
    if live is not None:
        _print_report(explain_kernel(args.addresses, live, source=getattr(args, "source", None),
                                     interface=getattr(args, "out_interface", None)), args.output)
    return EXIT_INVALID_CONFIG
