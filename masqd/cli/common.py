"""What the commands share: exit codes, building the agent from the flags, planning the rules
and printing what is wrong with them."""

from __future__ import annotations

import argparse
import sys

from masqd.agent import Agent, build_agent
from masqd.backends.base import BackendSettings
from masqd.cli.flags import kube_settings, options_from
from masqd.config import DEFAULT_CONFIG_PATH
from masqd.errors import ConfigError
from masqd.inputs import LoadedConfig, config_inputs
from masqd.plugins import Contribution, Plugins
from masqd.plan import plan_rules
from masqd.ruleset import RuleSet

EXIT_OK = 0
EXIT_INVALID_CONFIG = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_API = 4
EXIT_DRIFT = 5


def agent_from(args: argparse.Namespace, plugins: Plugins, *, once: bool, uses_backend: bool = True,
               **settings) -> Agent:
    """The agent the flags describe (``settings``: more of :func:`~masqd.agent.build_agent`'s).
    A command that never reaches the kernel (``validate``, ``explain`` without ``--live``:
    ``uses_backend=False``) does not create the ``--backend`` (its name was checked): the dry-run
    backend stands in, so a backend plugin that cannot be created here does not fail them."""
    options = options_from(args)
    kube = kube_settings(args)
    if uses_backend:
        backend = plugins.make_backend(args.backend, BackendSettings(
            options, args.iptables_mode, postrouting_jump=args.postrouting_jump,
            nftables_priority=args.nftables_priority))
    else:
        from masqd.backends.dryrun import DryRunBackend

        backend = DryRunBackend()
    inputs = config_inputs(args.config or [DEFAULT_CONFIG_PATH], args.config_dir, kube)
    return build_agent(options, backend=backend, config=inputs, plugins=plugins, kube=kube, once=once, **settings)


def print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(f"error: {exc.source}: {problem}", file=sys.stderr)
    for warning in exc.warnings:
        print(f"warning: {exc.source}: {warning}", file=sys.stderr)


def print_missing(agent: Agent) -> None:
    """A warning for each config file that did not exist (allowed, but a mistyped path must not pass
    unnoticed)."""
    for name, note in agent.loader.missing_files():
        print(f"warning: {name}: {note}", file=sys.stderr)


async def plan_and_report(agent: Agent) -> tuple[LoadedConfig, RuleSet, tuple[Contribution, ...]] | None:
    """The config and the plugins' contributions and vetoes: ``(loaded, ruleset, contributions)``,
    or ``None`` after printing every problem. The event sources are read once first (the API
    objects, if any; raises :class:`~masqd.errors.SourceReadError` when they cannot be)."""
    await agent.read_sources_once()
    try:
        loaded = agent.loader.load()
    except ConfigError as exc:
        print_missing(agent)
        print_problems(exc)
        return None
    print_missing(agent)
    for name, warning in loaded.warnings:
        print(f"warning: {name}: {warning}", file=sys.stderr)
    try:
        ruleset, contributions = await plan_rules(loaded.config, agent.options, agent.plugins, loaded.merged)
    except ConfigError as exc:
        print_problems(exc)
        return None
    return loaded, ruleset, contributions


def print_contributions(contributions: tuple[Contribution, ...], stream) -> None:
    for contribution in contributions:
        if not contribution.cidrs:
            continue
        shown = ", ".join(map(str, contribution.cidrs[:10])) + (", ..." if len(contribution.cidrs) > 10 else "")
        print(f"plugin {contribution.plugin}: {len(contribution.cidrs)} non-masquerade CIDRs"
              + (f": {shown}" if shown else ""), file=stream)
