"""Command-line flags: the parser of every command, Go flag syntax, and flag values.

Flags follow the upstream agent and Go's flag package: ``--flag``, ``-flag``, ``--flag=value``,
``--flag value``, and booleans as ``--flag`` or ``--flag=true|false``. A value that cannot be used
is refused here, while the command line is read (:class:`~masqd.errors.FlagError` becomes
argparse's usage error, reported as :mod:`masqd.cli.usage` says), never by the running daemon.
Each command takes the flags it reads and no others; what its help says besides them is in
:mod:`masqd.cli.help_texts`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from masqd import __version__
from masqd.backends.iptables.render import APPEND, JUMP_PLACEMENTS
from masqd.backends.iptables_mode import MODES
from masqd.cli.help_texts import DESCRIPTION, DESCRIPTIONS, EPILOG, SUMMARIES, epilog
from masqd.cli.usage import Parser
from masqd.config import DEFAULT_CONFIG_PATH, DEFAULT_MASQ_CHAIN, AgentOptions, parse_to_ports, validate_chain_name
from masqd.duration import parse_go_duration
from masqd.errors import FlagError
from masqd.flows import CONNTRACK_MODES, DEFAULT_CONNTRACK_MODE
from masqd.http import DEFAULT_ADDRESS as DEFAULT_HTTP_ADDRESS, parse_listen_address
from masqd.kube.settings import KubeSettings, parse_object_ref
from masqd.sources.drift import DRIFT_CHECK_SECONDS, MIN_DRIFT_CHECK_SECONDS

_GO_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_GO_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def _go_bool(text: str) -> bool:
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def _flag_type(parse):
    def convert(text: str):
        try:
            return parse(text)
        except FlagError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc.reason}") from None

    convert.__name__ = parse.__name__
    return convert


def _named_flag(flag: str, parse):
    """``_flag_type`` for a parser that takes the flag's name too (``parse(text, flag)``)."""
    def parse_flag(text: str):
        return parse(text, flag)

    parse_flag.__name__ = flag.replace("-", "_")
    return _flag_type(parse_flag)


def _nftables_priority(text: str) -> int:
    """``--nftables-priority`` (the nftables backend's parser, imported when the flag is given)."""
    from masqd.backends.nftables.render import parse_priority

    return _flag_type(parse_priority)(text)


def _add_bool(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", type=_go_bool, nargs="?", const=True, default=default, metavar="BOOL",
                        help=help if help is argparse.SUPPRESS else f"{help} (default {str(default).lower()})")


def _source_flags(group) -> None:
    group.add_argument("--config", action="append", default=None, metavar="PATH",
                       help=f"config file, YAML or JSON (default {DEFAULT_CONFIG_PATH}); repeat for several, which "
                            "merge; a missing file contributes nothing (with a warning naming it), and with no source "
                            "present the defaults apply; '-' is standard input (validate, render, explain)")
    group.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                       help="also read every ip-masq* file in DIR as a config source (as Azure's ip-masq-agent-v2 "
                            "does for user- and provider-owned ConfigMaps); repeatable")
    group.add_argument("--kube-configmap", type=_named_flag("kube-configmap", parse_object_ref),
                       metavar="NAMESPACE/NAME",
                       help="also watch this ConfigMap's 'config' key through the Kubernetes API (applied within "
                            "a second of an edit; deleting the ConfigMap removes it as a source)")
    _add_bool(group, "egress-nat-policies", False,
              "watch EgressNATPolicy objects (networking.gke.io/v1); NoSNAT destinations keep the pod address")
    group.add_argument("--kubeconfig", metavar="PATH",
                       help="Kubernetes credentials (default: in-cluster service account, else $KUBECONFIG, "
                            "else ~/.kube/config)")


def _backend_flag(group) -> None:
    group.add_argument("--backend", default="iptables", metavar="NAME",
                       help="how rules are programmed: iptables (default, as upstream), nftables, dry-run, "
                            "or a backend a plugin offers (see `masqd plugins`). Size: iptables' nft variant "
                            "reads back slowly past about 50k CIDRs (3 s a pass at 100k, 24 s at 200k); "
                            "nftables and legacy iptables handle 200k in seconds (docs/backends.md#size-limits)")


def _iptables_mode_flag(group) -> None:
    group.add_argument("--iptables-mode", choices=MODES, default="auto",
                       help="iptables variant for the iptables backend: auto picks the one the host "
                            "already uses (default auto)")


def _backend_tuning_flags(group) -> None:
    group.add_argument("--postrouting-jump", choices=JUMP_PLACEMENTS, default=APPEND,
                       help="iptables backend: append the jump to masqd's chain to nat POSTROUTING, after "
                            "kube-proxy's KUBE-POSTROUTING (default, as upstream), or insert it as the first "
                            "rule; a jump found in the other place is moved")
    group.add_argument("--nftables-priority", type=_nftables_priority, default=None, metavar="PRIORITY",
                       help="nftables backend: priority of masqd's nat postrouting chain: an integer, srcnat, "
                            "'srcnat + N' or 'srcnat - N' (default 'srcnat + 10': after kube-proxy's and "
                            "iptables' nat chains at srcnat); a table at another priority is rewritten")


def _masq_chain_flag(group) -> None:
    group.add_argument("--masq-chain", default=DEFAULT_MASQ_CHAIN, type=_flag_type(validate_chain_name),
                       help=f"name of the nat chain masqd owns (default {DEFAULT_MASQ_CHAIN})")


def _enable_ipv6_flag(group, help: str = "also program ip6tables and accept IPv6 CIDRs") -> None:
    _add_bool(group, "enable-ipv6", False, help)


def _rule_flags(group) -> None:
    _masq_chain_flag(group)
    _add_bool(group, "nomasq-all-reserved-ranges", False,
              "default non-masquerade list also holds every RFC-reserved IPv4 range")
    _enable_ipv6_flag(group)
    _add_bool(group, "random-fully", True, "add --random-fully to MASQUERADE when iptables supports it")
    group.add_argument("--to-ports", default="", type=_flag_type(parse_to_ports), metavar="PORTS",
                       help="source ports to masquerade to, e.g. 1024-29999,32768-65535, spread evenly")


def _plugin_flags(group) -> None:
    group.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                       help="do not load this plugin (repeatable); MASQD_PLUGINS=a,b loads only those "
                            "entry-point plugins")


def _log_flags(group, *, upstream: bool = True) -> None:
    """``--v`` and ``--log-format``; with ``upstream``, klog's ``--logtostderr`` too."""
    group.add_argument("--v", type=int, default=0, metavar="N", help="klog verbosity; 4 or more logs debug events")
    if upstream:
        _add_bool(group, "logtostderr", True, "accepted for upstream manifests; masqd always logs to stderr")
    group.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                       help="auto: JSON lines unless stderr is a terminal")


def _agent_flags(parser: argparse.ArgumentParser, *, backend_tuning: bool = True) -> argparse.ArgumentParser:
    """The flags of a command that reads the config as the agent does (run, validate, render,
    explain); ``backend_tuning``: the backend's own settings listed too (``validate`` creates no
    backend, but accepts them unlisted, checked as for ``run``, so a workload's flags can be
    copied into it whole)."""
    _source_flags(parser.add_argument_group("config sources"))
    backend = parser.add_argument_group("backend")
    _backend_flag(backend)
    listed = len(parser._actions)
    _iptables_mode_flag(backend)
    _backend_tuning_flags(backend)
    if not backend_tuning:
        for action in parser._actions[listed:]:
            action.help = argparse.SUPPRESS
    _rule_flags(parser.add_argument_group("rules"))
    _plugin_flags(parser.add_argument_group("plugins"))
    _log_flags(parser.add_argument_group("logging"))
    return parser


def _cleanup_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What ``cleanup`` reads: the backend, its iptables variant, the chain, the plugins. It
    removes both families and reads no config, but takes ``--config`` and ``--enable-ipv6``
    unlisted, so a command line written for ``run`` still works."""
    backend = parser.add_argument_group("backend")
    _backend_flag(backend)
    _iptables_mode_flag(backend)
    _masq_chain_flag(backend)
    parser.add_argument("--config", action="append", default=None, help=argparse.SUPPRESS)
    _enable_ipv6_flag(parser, help=argparse.SUPPRESS)
    _plugin_flags(parser.add_argument_group("plugins"))
    _log_flags(parser.add_argument_group("logging"), upstream=False)
    return parser


def _plugins_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _plugin_flags(parser)
    _log_flags(parser.add_argument_group("logging"), upstream=False)
    return parser


def _agent_defaults() -> dict:
    """Every agent flag's value when not given, for a command that does not take all of them (the
    code shared by the commands reads them all)."""
    return vars(_agent_flags(Parser(add_help=False)).parse_args([]))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="masqd", allow_abbrev=False, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"masqd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, allow_abbrev=False, help=SUMMARIES[name],
                                   description=DESCRIPTIONS[name], epilog=epilog(name),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    defaults = _agent_defaults()
    for sub in (_add_run_flags(_agent_flags(command("run"))), _agent_flags(command("validate"), backend_tuning=False),
                _agent_flags(command("render")), _add_explain_flags(_agent_flags(command("explain"))),
                _cleanup_flags(command("cleanup")), _plugins_flags(command("plugins"))):
        taken = {action.dest for action in sub._actions}
        sub.set_defaults(**{dest: value for dest, value in defaults.items() if dest not in taken})
    _add_controller_flags(command("controller"))
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--once", action="store_true", help="apply once and exit: 0 on success")
    parser.add_argument("--http-address", default=DEFAULT_HTTP_ADDRESS, metavar="HOST:PORT",
                        type=_flag_type(parse_listen_address),
                        help="serve /metrics, /healthz and /readyz here (default "
                             f"{DEFAULT_HTTP_ADDRESS}: every interface); an empty value disables it; "
                             "not used with --once")
    parser.add_argument("--drift-check-interval", default=DRIFT_CHECK_SECONDS, type=_drift_check_interval,
                        metavar="DURATION",
                        help="how often to read masqd's rules back between resyncs and restore them when "
                             "another process changed them (Go duration: 10s, 500ms; default "
                             f"{DRIFT_CHECK_SECONDS:g}s); the nftables backend follows `nft monitor` instead and "
                             "restores at once; 0 turns both off (the resync still heals)")
    parser.add_argument("--conntrack-reconcile", default=DEFAULT_CONNTRACK_MODE, choices=CONNTRACK_MODES,
                        metavar="|".join(CONNTRACK_MODES),
                        help="after an apply that changes what some traffic gets, delete the conntrack entries whose "
                             "NAT the new rules contradict, so live flows follow the config: udp (default) only UDP "
                             "flows, which the next datagram re-creates; all: TCP and the other protocols too (an "
                             "established TCP connection whose NAT changes breaks); none: leave live flows "
                             "(as upstream). Flows from the node's own addresses are never touched")
    parser.set_defaults(command="run")
    return parser


def _drift_check_interval(text: str) -> float:
    try:
        nanoseconds = parse_go_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; 0 turns the drift check off") from None
    seconds = nanoseconds / 1e9
    if seconds != 0 and not seconds >= MIN_DRIFT_CHECK_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least {MIN_DRIFT_CHECK_SECONDS * 1000:g}ms (each check "
                                         "reads the rules back); 0 turns the drift check off")
    return seconds


def _explain_address(text: str):
    from masqd.explain import parse_destination

    try:
        return parse_destination(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _explain_value(parse_name: str):
    """An argparse type calling :mod:`masqd.explain`'s ``parse_name`` (imported when used)."""
    def convert(text: str):
        from masqd import explain

        try:
            return getattr(explain, parse_name)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    convert.__name__ = parse_name.removeprefix("parse_")
    return convert


def _add_explain_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("addresses", nargs="+", type=_explain_address, metavar="ADDRESS",
                        help="a destination address, IPv4 or IPv6")
    parser.add_argument("--from", dest="source", type=_explain_value("parse_source"), metavar="SOURCE",
                        help="explain traffic from this source address (of the destinations' family), through "
                             "nonMasqueradeSourceCIDRs and masqueradeSourceCIDRs; without it, for a source they "
                             "leave to the destination, listing the sources that keep the pod address")
    parser.add_argument("--out-interface", type=_explain_value("parse_interface"), metavar="NAME",
                        help="explain traffic leaving through this interface (one name, no wildcard), through "
                             "outputInterfaces; without it, for an interface in the list")
    parser.add_argument("--live", action="store_true",
                        help="explain from the rules the kernel holds (read back through --backend, never "
                             "written), with the rules masqd does not write that may act on each address, and "
                             "name every difference from the desired state (exit 5 if any); with an invalid "
                             "config, from the kernel's rules alone (exit 1)")
    parser.add_argument("--output", choices=("text", "json"), default="text",
                        help="text (default), or json: a list with one object per address")
    return parser


def _add_controller_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``masqd controller``: its own flags only (none of the agent's rule flags apply to it)."""
    from masqd.controller.options import DEFAULT_LEASE, parse_cidr_flag

    parser.add_argument("--configmap", required=True, type=_named_flag("configmap", parse_object_ref),
                        metavar="NAMESPACE/NAME",
                        help="the ConfigMap the agents read; its 'config' key is written (created when absent)")
    parser.add_argument("--lease", default=DEFAULT_LEASE, type=_named_flag("lease", parse_object_ref),
                        metavar="NAMESPACE/NAME",
                        help=f"the Lease replicas elect a leader on; only the leader writes (default {DEFAULT_LEASE})")
    parser.add_argument("--service-cidr", action="append", default=[], metavar="CIDR",
                        type=_named_flag("service-cidr", parse_cidr_flag),
                        help="the cluster's Service range, kept in the masqd-managed policy (repeatable)")
    parser.add_argument("--node-cidr", action="append", default=[], metavar="CIDR",
                        type=_named_flag("node-cidr", parse_cidr_flag),
                        help="a range the nodes' addresses are in, kept in the masqd-managed policy (repeatable)")
    _add_bool(parser, "enable-ipv6", False,
              "write IPv6 destinations too (only when every agent runs with --enable-ipv6)")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="Kubernetes credentials (default: in-cluster service account, else $KUBECONFIG, "
                             "else ~/.kube/config)")
    parser.add_argument("--v", type=int, default=0, metavar="N", help="klog verbosity; 4 or more logs debug events")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                        help="auto: JSON lines unless stderr is a terminal")
    return parser


def build_alias_parser() -> argparse.ArgumentParser:
    """``ip-masq-agent``: the ``run`` command and its flags, no sub-command."""
    return _add_run_flags(_agent_flags(Parser(
        prog="ip-masq-agent", allow_abbrev=False,
        description="masqd run, under the upstream agent's name: same flags, same rules.",
        epilog=epilog("run"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )))


def normalize_go_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn Go's single-dash long flags (``-masq-chain=X``, ``-v=2``) into ``--`` form. A bare
    boolean flag followed by something that is not a boolean (``--enable-ipv6 2001:db8::1``)
    becomes ``--flag=true``: as in Go, the word after it is not its value (explain's addresses)."""
    known = {opt[2:] for action in _all_actions(parser) for opt in action.option_strings if opt.startswith("--")}
    booleans = {opt for action in _all_actions(parser) if action.type is _go_bool for opt in action.option_strings}
    out = []
    for index, arg in enumerate(argv):
        if arg.startswith("-") and not arg.startswith("--") and arg[1:].split("=", 1)[0] in known:
            arg = "-" + arg
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg in booleans and following is not None and not following.startswith("-") \
                and following not in _GO_TRUE | _GO_FALSE:
            arg += "=true"
        out.append(arg)
    return out


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from sub._actions


def options_from(args: argparse.Namespace) -> AgentOptions:
    return AgentOptions(
        masq_chain=args.masq_chain,
        nomasq_all_reserved_ranges=args.nomasq_all_reserved_ranges,
        enable_ipv6=args.enable_ipv6,
        random_fully=args.random_fully,
        to_ports=args.to_ports,
    )


def kube_settings(args: argparse.Namespace) -> KubeSettings | None:
    """The Kubernetes flags, or ``None`` when masqd is not to talk to the API."""
    settings = KubeSettings(configmap=args.kube_configmap, egress_nat_policies=args.egress_nat_policies,
                            kubeconfig=args.kubeconfig)
    return settings if settings.enabled else None
