"""The command line: ``masqd run|validate|render|explain|cleanup|plugins|controller`` and the
``ip-masq-agent`` alias.

Flags follow the upstream agent and Go's flag package (:mod:`masqd.cli.flags`). Each command is
one ``async def`` (:mod:`masqd.cli.agent_commands`, :mod:`masqd.cli.explain`,
:mod:`masqd.cli.controller`), run under one event loop.

Each command takes only the flags it reads; a mistake on the command line is reported by the
command that refused it, reason first, with the closest flag or command (:mod:`masqd.cli.usage`).

Exit codes: 0 success; 1 invalid configuration; 2 bad command line (or no Kubernetes credentials,
or a backend that cannot do what was asked); 3 the kernel could not be read or refused the rules;
4 an event source a one-shot command needs could not be read (the Kubernetes API with
``--kube-configmap`` / ``--egress-nat-policies``); 5 ``explain --live`` found the kernel's rules
differ from the desired state.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from masqd.cli import agent_commands
from masqd.cli.common import (EXIT_API, EXIT_BACKEND, EXIT_DRIFT, EXIT_INVALID_CONFIG, EXIT_OK, EXIT_USAGE,
                               agent_from)
from masqd.cli.flags import build_alias_parser, build_parser, kube_settings, normalize_go_flags, options_from
from masqd.cli.usage import command_parser, unknown_arguments
from masqd.errors import BackendUnsupported, FlagError, KubeError, PluginLoadError, SourceReadError
from masqd.logs import configure_logging, verbosity_to_level
from masqd.plugins import Plugins

__all__ = ["EXIT_API", "EXIT_BACKEND", "EXIT_DRIFT", "EXIT_INVALID_CONFIG", "EXIT_OK", "EXIT_USAGE", "agent_from",
           "build_alias_parser", "build_parser", "ip_masq_agent_main", "kube_settings", "main", "normalize_go_flags",
           "options_from"]

_COMMANDS = {"run": agent_commands.run, "validate": agent_commands.validate, "render": agent_commands.render,
             "cleanup": agent_commands.cleanup, "plugins": agent_commands.list_plugins}


async def _command(args: argparse.Namespace) -> int:
    # A command's modules are imported when it runs: `validate` and `render` start without the API
    # client (the controller) or explain's code (tests/test_command_imports.py checks).
    if args.command == "controller":
        from masqd.cli.controller import controller_command

        return await controller_command(args)
    plugins = Plugins.load(disabled=args.disable_plugin)
    plugins.check_backend(args.backend)  # for every command: a typo is a usage error
    if args.command == "explain":
        from masqd.cli.explain import explain_command

        return await explain_command(args, plugins)
    return await _COMMANDS[args.command](args, plugins)


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args, extras = parser.parse_known_args(normalize_go_flags(sys.argv[1:] if argv is None else argv, parser))
    if extras:  # reported by the command that refused them (argparse would blame the top level)
        command = command_parser(parser, getattr(args, "command", None))
        command.error(unknown_arguments(command, extras, parser))
    # Logs go to stderr for every command, so `masqd render | iptables-restore` gets only rules.
    configure_logging(verbosity_to_level(args.v), args.log_format)
    try:
        return anyio.run(_command, args)
    except (PluginLoadError, FlagError, KubeError, BackendUnsupported) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SourceReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API


def main(argv: Sequence[str] | None = None) -> int:
    """The ``masqd`` command. Arguments that start with a flag rather than a command mean ``run``
    (``masqd --masq-chain=X`` is ``masqd run --masq-chain=X``), so a manifest written for the
    upstream image, which passes only flags, works with the image swapped and nothing else."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version", "-version"):
        argv.insert(0, "run")
    return _dispatch(build_parser(), argv)


def ip_masq_agent_main(argv: Sequence[str] | None = None) -> int:
    """The ``ip-masq-agent`` command: ``masqd run`` with the upstream flags."""
    return _dispatch(build_alias_parser(), argv)
