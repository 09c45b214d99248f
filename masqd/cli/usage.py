"""How the command line reports a mistake: the reason first, naming the command that refused it
(``masqd run: error: ...``), the closest flag or command when there is one (``did you mean
--backend?``), then a one-line pointer to that command's ``--help`` instead of argparse's usage
block. The exit code stays 2, as argparse's."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` (and, through ``add_subparsers``, each command's) that
    reports errors as this module says."""

    _given: Sequence[str] = ()

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = [arg for arg in self._given if arg.startswith("-") and arg not in ("-", "--")
                   and arg.split("=", 1)[0] not in self._option_string_actions]
        if unknown and message.startswith("the following arguments are required"):
            message = unknown_arguments(self, unknown)  # the likelier cause: a mistyped flag
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")

    def _check_value(self, action, value):
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            raise argparse.ArgumentError(None, unknown_command(value, list(action.choices)))
        super()._check_value(action, value)


def unknown_command(name: str, commands: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, commands, n=1)
    if close:
        return f"unknown command {name!r}; did you mean {close[0]!r}?"
    return f"unknown command {name!r}; the commands are {', '.join(commands)}"


def command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (a sub-command of ``parser``), or ``parser`` itself."""
    for commands in _subparser_actions(parser):
        if command in commands.choices:
            return commands.choices[command]
    return parser


def unknown_arguments(parser: argparse.ArgumentParser, extras: Sequence[str],
                      top: argparse.ArgumentParser | None = None) -> str:
    """Why ``parser`` (a command of ``top``, or ``top`` itself) refused ``extras``: the first one,
    with the closest of its flags, or the commands that take it when ``parser`` does not."""
    first = extras[0]
    if not first.startswith("-") or first in ("-", "--"):
        return f"unexpected argument {first!r}"
    flag = "--" + first.split("=", 1)[0].lstrip("-")
    written = first.split("=", 1)[0]
    others = [name for name, sub in _commands(top or parser) if sub is not parser and flag in shown_flags(sub)]
    if others:
        return f"unknown flag {written}: {parser.prog} does not take it (a flag of {', '.join(others)})"
    close = difflib.get_close_matches(flag, shown_flags(parser), n=1)
    return f"unknown flag {written}" + (f"; did you mean {close[0]}?" if close else "")


def shown_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long flags ``parser``'s help lists."""
    return [opt for action in parser._actions if action.help is not argparse.SUPPRESS
            for opt in action.option_strings if opt.startswith("--") and opt != "--help"]


def _subparser_actions(parser: argparse.ArgumentParser):
    return [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]


def _commands(parser: argparse.ArgumentParser):
    for commands in _subparser_actions(parser):
        yield from commands.choices.items()
