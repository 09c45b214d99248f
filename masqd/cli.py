"""The command line: ``masqd run|validate|render|explain|cleanup|plugins|controller`` and the
``ip-masq-agent`` alias.

Flags follow the upstream agent and Go's flag package: ``--flag``, ``-flag``, ``--flag=value``,
``--flag value``, and booleans as ``--flag`` or ``--flag=true|false``.

Exit codes: 0 success; 1 invalid configuration; 2 bad command line (or no Kubernetes credentials);
3 the kernel could not be read or refused the rules; 4 the Kubernetes API could not be read (one-shot
commands with ``--kube-configmap`` / ``--egress-nat-policies``); 5 ``explain --live`` found the
kernel's rules differ from the desired state.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from collections.abc import Sequence

import anyio

from masqd import __version__
from masqd.backends import leftover_backends
from masqd.backends.iptables_mode import MODES
from masqd.backends.base import Backend, BackendSettings
from masqd.config import DEFAULT_CONFIG_PATH, DEFAULT_MASQ_CHAIN, AgentOptions, parse_to_ports, validate_chain_name
from masqd.duration import format_go_duration, parse_go_duration
from masqd.errors import BackendError, ConfigError, FlagError, KubeError, PluginLoadError
from masqd.http import DEFAULT_ADDRESS as DEFAULT_HTTP_ADDRESS, parse_address
from masqd.inputs import ConfigLoader, LoadedConfig, config_inputs
from masqd.kube import KubeSettings, parse_object_ref
from masqd.logs import configure_logging, verbosity_to_level
from masqd.plugins import Contribution, Plugins
from masqd.reconcile import Reconciler, plan, reconcile_once
from masqd.sources.drift import DRIFT_CHECK_SECONDS, MIN_DRIFT_CHECK_SECONDS

EXIT_OK = 0
EXIT_INVALID_CONFIG = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_API = 4
EXIT_DRIFT = 5

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


def _add_bool(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", type=_go_bool, nargs="?", const=True, default=default, metavar="BOOL",
                        help=f"{help} (default {str(default).lower()})")


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--config", action="append", default=None, metavar="PATH",
                        help=f"config file, YAML or JSON (default {DEFAULT_CONFIG_PATH}); repeat for several, which "
                             "merge; a missing file contributes nothing, and with no source present the defaults apply")
    common.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                        help="also read every ip-masq* file in DIR as a config source (as Azure's ip-masq-agent-v2 "
                             "does for user- and provider-owned ConfigMaps); repeatable")
    common.add_argument("--kube-configmap", type=_named_flag("kube-configmap", parse_object_ref),
                        metavar="NAMESPACE/NAME",
                        help="also watch this ConfigMap's 'config' key through the Kubernetes API (applied within "
                             "a second of an edit; deleting the ConfigMap removes it as a source)")
    _add_bool(common, "egress-nat-policies", False,
              "watch EgressNATPolicy objects (networking.gke.io/v1); NoSNAT destinations keep the pod address")
    common.add_argument("--kubeconfig", metavar="PATH",
                        help="Kubernetes credentials (default: in-cluster service account, else $KUBECONFIG, "
                             "else ~/.kube/config)")
    common.add_argument("--backend", default="iptables", metavar="NAME",
                        help="how rules are programmed: iptables (default, as upstream), nftables, dry-run, "
                             "or a backend a plugin offers (see `masqd plugins`)")
    common.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="do not load this plugin (repeatable); MASQD_PLUGINS=a,b loads only those "
                             "entry-point plugins")
    common.add_argument("--iptables-mode", choices=MODES, default="auto",
                        help="iptables variant for the iptables backend: auto picks the one the host "
                             "already uses (default auto)")
    common.add_argument("--masq-chain", default=DEFAULT_MASQ_CHAIN, type=_flag_type(validate_chain_name),
                        help=f"name of the nat chain masqd owns (default {DEFAULT_MASQ_CHAIN})")
    _add_bool(common, "nomasq-all-reserved-ranges", False,
              "default non-masquerade list also holds every RFC-reserved IPv4 range")
    _add_bool(common, "enable-ipv6", False, "also program ip6tables and accept IPv6 CIDRs")
    _add_bool(common, "random-fully", True, "add --random-fully to MASQUERADE when iptables supports it")
    common.add_argument("--to-ports", default="", type=_flag_type(parse_to_ports), metavar="PORTS",
                        help="source ports to masquerade to, e.g. 1024-29999,32768-65535, spread evenly")
    common.add_argument("--v", type=int, default=0, metavar="N", help="klog verbosity; 4 or more logs debug events")
    _add_bool(common, "logtostderr", True, "accepted for upstream manifests; masqd always logs to stderr")
    common.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                        help="auto: JSON lines unless stderr is a terminal")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masqd", allow_abbrev=False,
        description="IP masquerade agent: a drop-in ip-masq-agent with an event-driven core.",
        epilog="Exit codes: 0 ok, 1 invalid config, 2 bad command line, 3 kernel read/write failed, "
               "4 Kubernetes API unreadable, 5 explain --live: the kernel differs from the desired state.",
    )
    parser.add_argument("--version", action="version", version=f"masqd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_flags()
    _add_run_flags(commands.add_parser("run", parents=[common], allow_abbrev=False,
                                       help="run the agent (default command of the ip-masq-agent alias)"))
    commands.add_parser("validate", parents=[common], allow_abbrev=False,
                        help="check a config file: exit 0 if valid, 1 with one line per problem")
    commands.add_parser("render", parents=[common], allow_abbrev=False,
                        help="print the exact rules the backend would apply, touching nothing")
    _add_explain_flags(commands.add_parser(
        "explain", parents=[common], allow_abbrev=False,
        help="say whether traffic to each ADDRESS keeps the pod address or is masqueraded, and why",
        epilog="Exit codes: 0 ok, 1 invalid config, 2 bad command line (or a backend that cannot read back "
               "for --live), 3 the kernel could not be read, 4 Kubernetes API unreadable, 5 --live: the "
               "kernel's rules differ from the desired state."))
    commands.add_parser("cleanup", parents=[common], allow_abbrev=False,
                        help="remove everything masqd created with this backend, and nothing else")
    commands.add_parser("plugins", parents=[common], allow_abbrev=False,
                        help="list the loaded plugins, their versions and the hooks each implements")
    _add_controller_flags(commands.add_parser(
        "controller", allow_abbrev=False,
        help="cluster controller: translate EgressNATPolicy objects into the agents' ConfigMap"))
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--once", action="store_true", help="apply once and exit: 0 on success")
    parser.add_argument("--http-address", default=DEFAULT_HTTP_ADDRESS, metavar="HOST:PORT",
                        type=_flag_type(parse_address),
                        help="serve /metrics, /healthz and /readyz here (default "
                             f"{DEFAULT_HTTP_ADDRESS}: every interface); an empty value disables it; "
                             "not used with --once")
    parser.add_argument("--drift-check-interval", default=DRIFT_CHECK_SECONDS, type=_drift_check_interval,
                        metavar="DURATION",
                        help="how often to read masqd's rules back between resyncs and restore them when "
                             "another process changed them (Go duration: 10s, 500ms; default "
                             f"{DRIFT_CHECK_SECONDS:g}s); the nftables backend follows `nft monitor` instead and "
                             "restores at once; 0 turns both off (the resync still heals)")
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
    from masqd.explain import parse_address as parse_explained_address

    try:
        return parse_explained_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _add_explain_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("addresses", nargs="+", type=_explain_address, metavar="ADDRESS",
                        help="a destination address, IPv4 or IPv6")
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
    from masqd.controller import DEFAULT_LEASE, parse_cidr_flag

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
    return _add_run_flags(argparse.ArgumentParser(
        prog="ip-masq-agent", parents=[_common_flags()], allow_abbrev=False,
        description="masqd run, under the upstream agent's name: same flags, same rules.",
    ))


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


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(f"error: {exc.source}: {problem}", file=sys.stderr)
    for warning in exc.warnings:
        print(f"warning: {exc.source}: {warning}", file=sys.stderr)


def kube_settings(args: argparse.Namespace) -> KubeSettings | None:
    """The Kubernetes flags, or ``None`` when masqd is not to talk to the API."""
    settings = KubeSettings(configmap=args.kube_configmap, egress_nat_policies=args.egress_nat_policies,
                            kubeconfig=args.kubeconfig)
    return settings if settings.enabled else None


def config_loader(args: argparse.Namespace, options: AgentOptions, kube: KubeSettings | None) -> ConfigLoader:
    """Every config input the flags name: files, directories, then the API ConfigMap."""
    inputs = config_inputs(args.config or [DEFAULT_CONFIG_PATH], args.config_dir)
    if kube is not None and kube.configmap is not None:
        from masqd.sources.kube import ConfigMapInput

        inputs.append(ConfigMapInput(kube.configmap, kube))
    return ConfigLoader(inputs, options)


def _load_and_report(loader: ConfigLoader) -> LoadedConfig | None:
    """Load the config; print its problems and warnings. ``None`` when it is invalid."""
    try:
        loaded = loader.load()
    except ConfigError as exc:
        _print_problems(exc)
        return None
    for name, warning in loaded.warnings:
        print(f"warning: {name}: {warning}", file=sys.stderr)
    return loaded


def _plan_and_report(args: argparse.Namespace, options: AgentOptions, plugins: Plugins,
                     loader: ConfigLoader | None = None):
    """The config and the plugins' contributions and vetoes: ``(loaded, ruleset, contributions)``,
    or ``None`` after printing every problem. The API objects, if any, are read once first
    (raises :class:`KubeError` when they cannot be). ``loader``: the one to load with (the caller
    keeps it to look at the texts read); by default one for the flags."""
    kube = kube_settings(args)
    loader = loader or config_loader(args, options, kube)
    if kube is not None:
        anyio.run(_read_api_once, kube, loader, plugins)
    loaded = _load_and_report(loader)
    if loaded is None:
        return None
    try:
        ruleset, contributions = anyio.run(plan, loaded.config, options, plugins)
    except ConfigError as exc:
        _print_problems(exc)
        return None
    return loaded, ruleset, contributions


class _ApiUnreadable(Exception):
    """A one-shot command could not read the API objects it was asked to use (exit 4)."""


async def _read_api_once(kube: KubeSettings, loader: ConfigLoader, plugins: Plugins) -> None:
    from masqd.sources.kube import read_once

    try:
        await read_once(kube, loader.inputs, plugins)
    except KubeError:
        raise  # no credentials: a usage error
    except Exception as exc:  # the API cannot answer: a one-shot command cannot go on without it
        raise _ApiUnreadable(f"cannot read the Kubernetes API: {exc}") from None


def _cmd_validate(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    planned = _plan_and_report(args, options, plugins)
    if planned is None:
        return EXIT_INVALID_CONFIG
    merged, contributions = planned[0].merged, planned[2]
    config = merged.config
    origin = ", ".join(merged.sources) or "defaults (no config source present)"
    print(f"ok: {origin}: {len(config.non_masquerade_cidrs)} non-masquerade CIDRs, "
          f"resyncInterval {format_go_duration(config.resync_interval_ns)}, cidrLimit {config.cidr_limit}")
    _print_contributions(contributions, sys.stdout)
    return EXIT_OK


def _print_origins(loaded: LoadedConfig, stream) -> None:
    """With several config sources: which source listed each CIDR."""
    if len(loaded.merged.sources) < 2:
        return
    for net, names in loaded.merged.origins.items():
        print(f"{net}: from {', '.join(names)}", file=stream)


def _print_contributions(contributions: tuple[Contribution, ...], stream) -> None:
    for contribution in contributions:
        if not contribution.cidrs:
            continue
        shown = ", ".join(map(str, contribution.cidrs[:10])) + (", ..." if len(contribution.cidrs) > 10 else "")
        print(f"plugin {contribution.plugin}: {len(contribution.cidrs)} non-masquerade CIDRs"
              + (f": {shown}" if shown else ""), file=stream)


async def _render_text(backend: Backend, ruleset) -> str:
    try:
        await backend.probe()
    except BackendError:
        pass  # tools missing here: show what a current version would get
    return backend.render(ruleset)


def _cmd_render(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    planned = _plan_and_report(args, options, plugins)
    if planned is None:
        return EXIT_INVALID_CONFIG
    backend = _backend(args, options, plugins)
    _print_origins(planned[0], sys.stderr)  # stdout is exactly the script
    _print_contributions(planned[2], sys.stderr)
    sys.stdout.write(anyio.run(_render_text, backend, planned[1]))
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    """Each address against the desired state (with ``--live``, the kernel's rules too)."""
    from masqd.explain import explain
    from masqd.provenance import cidr_origins

    loader = config_loader(args, options, kube_settings(args))
    planned = _plan_and_report(args, options, plugins, loader)
    if planned is None:
        # with --live, the kernel still holds the last good rules: explain from them alone
        return _explain_kernel_only(args, options, plugins) if args.live else EXIT_INVALID_CONFIG
    loaded, ruleset, contributions = planned
    descriptions, problems = anyio.run(plugins.describe_cidrs, contributions)
    for problem in problems:
        print(f"warning: plugin {problem}; its CIDRs are shown without that detail", file=sys.stderr)
    origins = cidr_origins(ruleset, loaded.merged, contributions, options, loader.texts(), descriptions=descriptions)
    live = None
    if args.live:
        live = _read_back(args, options, plugins, ruleset)
        if live is None:
            return EXIT_BACKEND
    config = loaded.config
    report = explain(args.addresses, ruleset, origins, live, masq_link_local=config.masq_link_local,
                     masq_link_local_ipv6=config.masq_link_local_ipv6)
    _print_report(report, args.output)
    return EXIT_DRIFT if report.drift else EXIT_OK


def _print_report(report, output: str) -> None:
    """An explain report on stdout: ``text`` or ``json`` (a list of objects)."""
    import json

    from masqd.explain import as_json, format_text

    sys.stdout.write(json.dumps(as_json(report), indent=2) + "\n" if output == "json" else format_text(report))


def _read_back(args: argparse.Namespace, options: AgentOptions, plugins: Plugins, ruleset):
    """What the kernel holds of ``ruleset``'s rules (``explain --live``); ``None`` after printing
    why the kernel could not be read."""
    backend = _backend(args, options, plugins)
    reconciler = Reconciler(backend, options, config_loader(args, options, None))  # the one caller of backends
    try:
        return anyio.run(reconciler.read_back, ruleset)  # no read_back: FlagError, a usage error (exit 2)
    except BackendError as exc:
        print(f"error: {backend.name}: {exc}", file=sys.stderr)
        return None


def _explain_kernel_only(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    """``explain --live`` with an invalid config (its problems already printed): each address from
    the rules the kernel holds alone; exits 1 all the same."""
    from masqd.config import parse_config
    from masqd.explain import explain_kernel
    from masqd.ruleset import compute_ruleset

    # only which families and which chain to read come from this: the flags decide both
    shape = compute_ruleset(parse_config(None, options).config, options)
    live = _read_back(args, options, plugins, shape)
    if live is not None:
        _print_report(explain_kernel(args.addresses, live), args.output)
    return EXIT_INVALID_CONFIG


def _cmd_cleanup(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    reconciler = Reconciler(_backend(args, options, plugins), options, config_loader(args, options, None))
    try:
        removed = anyio.run(reconciler.cleanup)
    except BackendError as exc:
        print(f"error: {args.backend}: {exc}", file=sys.stderr)
        return EXIT_BACKEND
    print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
    return EXIT_OK


def _cmd_plugins(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    for info in plugins.describe():
        origin = "built-in" if info.builtin else (f"{info.distribution} {info.version}" if info.distribution else "-")
        print(f"{info.name}  ({origin})  hooks: {', '.join(info.hooks) or '-'}")
    print(f"backends: {', '.join(plugins.backend_names())}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> int:
    backend = _backend(args, options, plugins)
    kube = kube_settings(args)
    loader = config_loader(args, options, kube)
    if args.once:
        audits: list = []
        reconciler = Reconciler(backend, options, loader, leftovers=leftover_backends, plugins=plugins,
                                on_audit=audits.append)
        try:
            if kube is not None:
                anyio.run(_read_api_once, kube, loader, plugins)
            anyio.run(reconcile_once, reconciler, audits)
        except ConfigError as exc:
            _print_problems(exc)
            return EXIT_INVALID_CONFIG
        except BackendError as exc:
            print(f"error: {backend.name}: {exc}", file=sys.stderr)
            return EXIT_BACKEND
        return EXIT_OK
    from masqd.daemon import run_daemon
    from masqd.kube import load_kube_config

    if kube is not None:
        load_kube_config(kube.kubeconfig)  # no credentials: a start-up error, not a retry loop
    reconciler = Reconciler(backend, options, loader, leftovers=leftover_backends, plugins=plugins)
    anyio.run(partial(run_daemon, backend, options, loader, reconciler=reconciler, plugins=plugins, kube=kube,
                      http_address=args.http_address, drift_check_interval=args.drift_check_interval))
    return EXIT_OK


def _cmd_controller(args: argparse.Namespace) -> int:
    """The controller loads no plugins and none of the agent's rule flags apply to it."""
    from masqd.controller import ControllerOptions, run_controller
    from masqd.kube import load_kube_config

    settings = KubeSettings(kubeconfig=args.kubeconfig)
    load_kube_config(settings.kubeconfig)  # no credentials: a start-up error (exit 2), not a retry loop
    controller_options = ControllerOptions(configmap=args.configmap, lease=args.lease,
                                           service_cidrs=tuple(args.service_cidr), node_cidrs=tuple(args.node_cidr),
                                           enable_ipv6=args.enable_ipv6)
    anyio.run(run_controller, controller_options, settings)
    return EXIT_OK


def _backend(args: argparse.Namespace, options: AgentOptions, plugins: Plugins) -> Backend:
    return plugins.make_backend(args.backend, BackendSettings(options, args.iptables_mode))


_COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "render": _cmd_render, "explain": _cmd_explain,
             "cleanup": _cmd_cleanup, "plugins": _cmd_plugins}


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(normalize_go_flags(sys.argv[1:] if argv is None else argv, parser))
    # Logs go to stderr for every command, so `masqd render | iptables-restore` gets only rules.
    configure_logging(verbosity_to_level(args.v), args.log_format)
    try:
        if args.command == "controller":
            return _cmd_controller(args)
        plugins = Plugins.load(disabled=args.disable_plugin)
        plugins.check_backend(args.backend)  # for every command: a typo is a usage error
        return _COMMANDS[args.command](args, options_from(args), plugins)
    except (PluginLoadError, FlagError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _ApiUnreadable as exc:
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
