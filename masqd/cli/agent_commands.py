"""The agent's commands: ``run`` (the daemon, or ``--once``), ``validate``, ``render``,
``cleanup`` and ``plugins``. Each is one ``async def`` run under the command line's one event loop."""

from __future__ import annotations

import argparse
import sys

from masqd.cli.common import (EXIT_BACKEND, EXIT_INVALID_CONFIG, EXIT_OK, EXIT_USAGE, agent_from, plan_and_report,
                              print_contributions, print_problems)
from masqd.duration import format_go_duration
from masqd.errors import BackendError, ConfigError
from masqd.inputs import STDIN, LoadedConfig
from masqd.logs import quiet
from masqd.plugins import Plugins


async def run(args: argparse.Namespace, plugins: Plugins) -> int:
    """The agent: until SIGTERM, or one pass with ``--once`` (0 on success)."""
    from masqd.backends.leftovers import leftover_backends  # every backend's code: only `run` looks for leftovers

    if STDIN in (args.config or ()):
        print(f"error: --config {STDIN}: standard input is read by validate, render and explain; run needs a config "
              "file it can watch for changes", file=sys.stderr)
        return EXIT_USAGE
    if args.once:
        agent = agent_from(args, plugins, once=True, leftovers=leftover_backends, conntrack=args.conntrack_reconcile)
        try:
            await agent.run_once()
        except ConfigError as exc:
            print_problems(exc)
            return EXIT_INVALID_CONFIG
        except BackendError as exc:
            print(f"error: {agent.backend.name}: {exc}", file=sys.stderr)
            return EXIT_BACKEND
        return EXIT_OK
    from masqd.daemon import run_daemon

    agent = agent_from(args, plugins, once=False, leftovers=leftover_backends, http_address=args.http_address,
                       drift_check_interval=args.drift_check_interval, conntrack=args.conntrack_reconcile)
    if agent.kube is not None:
        from masqd.kube.client import load_kube_config  # the API client library: only with a Kubernetes flag

        load_kube_config(agent.kube.kubeconfig)  # no credentials: a start-up error, not a retry loop
    await run_daemon(agent)
    return EXIT_OK


async def validate(args: argparse.Namespace, plugins: Plugins) -> int:
    planned = await plan_and_report(agent_from(args, plugins, once=True, uses_backend=False))
    if planned is None:
        return EXIT_INVALID_CONFIG
    merged, contributions = planned[0].merged, planned[2]
    config = merged.config
    origin = ", ".join(merged.sources) or "defaults (no config source present)"
    print(f"ok: {origin}: {len(config.non_masquerade_cidrs)} non-masquerade CIDRs, "
          f"resyncInterval {format_go_duration(config.resync_interval_ns)}, cidrLimit {config.cidr_limit}"
          + "".join(f", {item}" for item in decision_summary(config)))
    _print_contributions(contributions, sys.stdout)
    return EXIT_OK


def decision_summary(config) -> list[str]:
    """The decision model's keys beyond upstream the config sets, one item each (``3
    masqueradeCIDRs``, ``snatToAddress 192.0.2.10``, ``outputInterfaces [eth0, ens+]``); empty when
    none is set, so an upstream config's summary is upstream's."""
    items = [f"{len(getattr(config, field))} {key}" for key, field in (
        ("masqueradeCIDRs", "masquerade_cidrs"), ("masqueradeSourceCIDRs", "masquerade_source_cidrs"),
        ("nonMasqueradeSourceCIDRs", "non_masquerade_source_cidrs")) if getattr(config, field)]
    return items + _settings(config)


def _settings(config) -> list[str]:
    """``snatToAddress[IPv6]`` and ``outputInterfaces`` as :func:`decision_summary` names them."""
    items = [f"{key} {address}" for key, address in (("snatToAddress", config.snat_to_address),
                                                     ("snatToAddressIPv6", config.snat_to_address_ipv6))
             if address is not None]
    if config.output_interfaces:
        items.append(f"outputInterfaces [{', '.join(config.output_interfaces)}]")
    return items


def _print_contributions(contributions, stream) -> None:
    """The plugins' non-masquerade CIDRs (as before), then their masquerade entries, each named so."""
    print_contributions(tuple(c for c in contributions if not getattr(c, "masquerade", False)), stream)
    for contribution in contributions:
        if getattr(contribution, "masquerade", False) and contribution.cidrs:
            shown = ", ".join(map(str, contribution.cidrs[:10])) + (", ..." if len(contribution.cidrs) > 10 else "")
            print(f"plugin {contribution.plugin}: {len(contribution.cidrs)} masquerade CIDRs (masquerade_cidrs): "
                  f"{shown}", file=stream)


async def render(args: argparse.Namespace, plugins: Plugins) -> int:
    agent = agent_from(args, plugins, once=True)
    planned = await plan_and_report(agent)
    if planned is None:
        return EXIT_INVALID_CONFIG
    _print_origins(planned[0], sys.stderr)  # stdout is exactly the script
    _print_contributions(planned[2], sys.stderr)
    with quiet():  # what the backend's probe learns (the iptables variant chosen) is no news here
        script = await agent.reconciler.render(planned[1])
    sys.stdout.write(script)
    return EXIT_OK


async def cleanup(args: argparse.Namespace, plugins: Plugins) -> int:
    agent = agent_from(args, plugins, once=True)
    try:
        removed = await agent.reconciler.cleanup()
    except BackendError as exc:
        print(f"error: {args.backend}: {exc}", file=sys.stderr)
        return EXIT_BACKEND
    print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
    return EXIT_OK


async def list_plugins(args: argparse.Namespace, plugins: Plugins) -> int:
    for info in plugins.describe():
        origin = "built-in" if info.builtin else (f"{info.distribution} {info.version}" if info.distribution else "-")
        print(f"{info.name}  ({origin})  hooks: {', '.join(info.hooks) or '-'}")
    print(f"backends: {', '.join(plugins.backend_names())}")
    return EXIT_OK


def _print_origins(loaded: LoadedConfig, stream) -> None:
    """With several config texts: which one listed each CIDR (of another list than
    ``nonMasqueradeCIDRs``: named after the CIDR)."""
    if len(loaded.merged.sources) < 2:
        return
    for net, names in loaded.merged.origins.items():
        print(f"{net}: from {', '.join(names)}", file=stream)
    for key, origins in (loaded.merged.list_origins or {}).items():
        for net, names in origins.items():
            print(f"{net} ({key}): from {', '.join(names)}", file=stream)
    settings = _settings(loaded.merged.config)
    if settings:
        print(f"merged: {', '.join(settings)}", file=stream)
