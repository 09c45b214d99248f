"""What ``masqd COMMAND --help`` says about each command besides its flags: a description, and
its exit codes (the numbers are :mod:`masqd.cli.common`'s). Kept here so the parsers
(:mod:`masqd.cli.flags`) stay about flags."""

from __future__ import annotations

import textwrap

DESCRIPTION = "IP masquerade agent: a drop-in ip-masq-agent with an event-driven core."

EPILOG = ("Exit codes: 0 ok, 1 invalid config, 2 bad command line, 3 kernel read/write failed, "
          "4 an event source (the Kubernetes API, a plugin's source) unreadable, 5 explain --live: the kernel differs from the "
          "desired state. Flags given without a command mean `run`; `masqd COMMAND --help` shows a command's "
          "flags.")

#: The one-line summary ``masqd --help`` lists for each command.
SUMMARIES = {
    "run": "run the agent (default command of the ip-masq-agent alias)",
    "validate": "check a config file: exit 0 if valid, 1 with one line per problem",
    "render": "print the exact rules the backend would apply, touching nothing",
    "explain": "say whether traffic to each ADDRESS keeps the pod address or is masqueraded, and why",
    "cleanup": "remove everything masqd created with this backend, and nothing else",
    "plugins": "list the loaded plugins, their versions and the hooks each implements",
    "controller": "cluster controller: translate EgressNATPolicy objects into the agents' ConfigMap",
}

#: What ``masqd COMMAND --help`` says above the flags (printed as written: lines under 100 chars).
DESCRIPTIONS = {
    "run": """\
Run the agent: keep the kernel's masquerade rules what the config sources and flags describe,
applying a change as soon as a source changes and restoring rules another process altered, until
SIGTERM or SIGINT (the rules stay in the kernel). With --once, apply once and exit. Flags given
without a command, and the ip-masq-agent command, mean this command.""",
    "validate": """\
Check the config sources as `run` with the same flags would read them, and print a summary of
the result; nothing is applied. Each problem is one line on stderr, naming the key and value.""",
    "render": """\
Print the exact rules --backend would write (iptables-restore or `nft -f` input) to a kernel
holding none of masqd's, touching nothing. Only the rules go to stdout, so the output can be piped;
notes and logs go to stderr.""",
    "explain": """\
Say whether traffic to each ADDRESS keeps the pod address or is masqueraded, and why: the
interface and source rules, the deciding prefix and where it came from. With --live, from the rules
the kernel holds too.""",
    "cleanup": """\
Remove everything masqd created with --backend, IPv4 and IPv6: the iptables chain --masq-chain and
masqd's jumps to it from nat POSTROUTING (with --iptables-mode auto, in every installed iptables
variant), or masqd's nftables tables. Nothing else is touched. Stop the agent first: a running one
restores its rules.""",
    "plugins": """\
List the loaded plugins (built-in, and installed ones from the 'masqd' entry-point group) with
their versions and the hooks each implements, then the backends they offer. MASQD_PLUGINS=a,b loads
only those entry-point plugins.""",
    "controller": """\
Cluster controller: translate EgressNATPolicy objects into the agents' ConfigMap (its 'config'
key). Replicas elect a leader on a Lease; only the leader writes.""",
}

_USAGE = "bad command line (the reason is printed first)"

#: ``masqd COMMAND --help``'s closing section: each exit code the command can end with.
EXIT_CODES = {
    "run": (
        (0, "stopped by SIGTERM or SIGINT; with --once, the rules were applied"),
        (1, "--once: invalid configuration (each problem on stderr; the kernel keeps its rules)"),
        (2, f"{_USAGE}, a plugin that failed to load, no Kubernetes credentials, or a backend that cannot "
            "do what was asked"),
        (3, "--once: the kernel could not be read or refused the rules"),
        (4, "--once: an event source (the Kubernetes API, a plugin's source) could not be read"),
    ),
    "validate": (
        (0, "valid"),
        (1, "invalid configuration (one line per problem on stderr)"),
        (2, f"{_USAGE}, or a plugin that failed to load"),
        (4, "an event source (the Kubernetes API, a plugin's source) could not be read"),
    ),
    "render": (
        (0, "the rules are on stdout"),
        (1, "invalid configuration (one line per problem on stderr)"),
        (2, f"{_USAGE}, or a plugin or backend that failed to load"),
        (4, "an event source (the Kubernetes API, a plugin's source) could not be read"),
    ),
    "explain": (
        (0, "ok"),
        (1, "invalid configuration (with --live, each address is still explained from the kernel's rules)"),
        (2, f"{_USAGE}, or a backend that cannot read back for --live"),
        (3, "--live: the kernel could not be read"),
        (4, "an event source (the Kubernetes API, a plugin's source) could not be read"),
        (5, "--live: the kernel's rules differ from the desired state"),
    ),
    "cleanup": (
        (0, "removed what there was, or found nothing to remove (stdout says which)"),
        (2, f"{_USAGE}, or a plugin or backend that failed to load"),
        (3, "the kernel could not be read or refused the change"),
    ),
    "plugins": (
        (0, "listed"),
        (2, f"{_USAGE}, or a plugin that failed to load"),
    ),
    "controller": (
        (0, "stopped by SIGTERM or SIGINT (a leader releases its Lease first)"),
        (2, f"{_USAGE}, or no Kubernetes credentials"),
    ),
}


def epilog(command: str) -> str:
    """The exit codes of ``command``, one per code (wrapped under 100 columns)."""
    return "exit codes:\n" + "\n".join(textwrap.fill(meaning, 99, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
                                        for code, meaning in EXIT_CODES[command])
