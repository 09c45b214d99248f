"""The command line: ``masqd validate|render|run`` and the ``ip-masq-agent`` alias.

Most tests run ``masqd.cli.main`` in-process; a few run the installed entry points to check the
console scripts themselves. Only the dry-run backend is used: nothing here touches the kernel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from masqd.cli import ip_masq_agent_main, main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
GOLDEN = Path(__file__).parent / "golden" / "iptables"
BIN = Path(sys.executable).parent


def golden(name: str) -> str:
    return (GOLDEN / f"{name}.txt").read_text()



@pytest.fixture
def missing(tmp_path) -> str:
    return str(tmp_path / "no-such-config")


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "ip-masq-agent") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def exit_code(argv, entry=main) -> int:
    """The exit code of ``entry(argv)``, whether it returns it or argparse raises SystemExit."""
    try:
        return entry(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# --- validate -------------------------------------------------------------------------------------


def test_validate_valid_file_exits_0(capsys):
    assert main(["validate", "--config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {EXAMPLE}:")
    assert err == ""


def test_validate_missing_file_is_defaults_and_exits_0(capsys, missing):
    assert main(["validate", "--config", missing]) == 0
    assert capsys.readouterr().out.startswith("ok: defaults")


def test_validate_invalid_file_exits_1_with_one_line_per_problem(capsys, write):
    path = write(
        "nonMasqueradeCIDRs:\n"
        "  - 10.0.0.1/8\n"
        "  - \"10.0.0.0/8\\n-A POSTROUTING -j ACCEPT\"\n"
        "  - fd00::/8\n"
        "resyncInterval: 60\n"
    )
    assert main(["validate", "--config", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"error: {path}: ") for line in lines)
    assert "nonMasqueradeCIDRs[0]: '10.0.0.1/8'" in lines[0] and "'10.0.0.0/8'" in lines[0]
    assert "nonMasqueradeCIDRs[1]" in lines[1]  # the value's newline is escaped, not a second line
    assert "nonMasqueradeCIDRs[2]: 'fd00::/8'" in lines[2] and "--enable-ipv6" in lines[2]
    assert "resyncInterval: 60" in lines[3]


def test_validate_accepts_ipv6_with_enable_ipv6(capsys, write):
    path = write('nonMasqueradeCIDRs: ["fd00::/8"]\n')
    assert main(["validate", "--config", path]) == 1
    assert main(["validate", "--config", path, "--enable-ipv6"]) == 0


def test_validate_reports_parse_error_with_line(capsys, write):
    path = write("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n - 172.16.0.0/12\n")
    assert main(["validate", "--config", path]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: <line 3, column ")


def test_validate_prints_warnings_but_exits_0(capsys, write):
    path = write("nonMasqueradeCIRDs: [100.64.0.0/10]\n")
    assert main(["validate", "--config", path]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: {path}: nonMasqueradeCIRDs")
    assert "did you mean 'nonMasqueradeCIDRs'?" in line


# --- render ---------------------------------------------------------------------------------------

V6_CONFIG = 'nonMasqueradeCIDRs: [10.0.0.0/8, "fd00::/8", 192.168.0.0/16, "2001:db8::/32"]\n'
ONLY_10 = "nonMasqueradeCIDRs: [10.0.0.0/8]\n"


@pytest.mark.parametrize(
    ("config_text", "flags", "name"),
    [
        pytest.param(None, [], "defaults", id="defaults"),
        pytest.param(None, ["--nomasq-all-reserved-ranges"], "nomasq_all_reserved_ranges", id="reserved-bare-flag"),
        pytest.param(None, ["-nomasq-all-reserved-ranges=true"], "nomasq_all_reserved_ranges", id="reserved-go-single-dash"),
        pytest.param(None, ["-masq-chain=MASQD-EGRESS"], "custom_chain", id="go-single-dash-equals"),
        pytest.param(None, ["--masq-chain", "MASQD-EGRESS"], "custom_chain", id="masq-chain-space-value"),
        pytest.param(None, ["--random-fully=false"], "random_fully_false", id="random-fully-equals-false"),
        pytest.param(None, ["--random-fully", "false"], "random_fully_false", id="random-fully-space-false"),
        pytest.param(None, ["-random-fully=0"], "random_fully_false", id="random-fully-go-0"),
        pytest.param(None, ["--random-fully=F"], "random_fully_false", id="random-fully-go-F"),
        pytest.param(None, ["--random-fully=true"], "defaults", id="random-fully-true"),
        pytest.param(V6_CONFIG, ["--enable-ipv6", "true"], "ipv6", id="enable-ipv6-space-true"),
        pytest.param(V6_CONFIG, ["--enable-ipv6"], "ipv6", id="enable-ipv6-bare"),
        pytest.param(V6_CONFIG, ["-enable-ipv6=T"], "ipv6", id="enable-ipv6-go-T"),
        pytest.param("masqLinkLocal: true\n", [], "masq_link_local", id="masqLinkLocal"),
        pytest.param(ONLY_10, ["--to-ports", "1024-29999,32768-65535"], "to_ports_two_ranges", id="to-ports"),
        pytest.param(ONLY_10, ["--to-ports=8000"], "to_ports_single_port", id="to-ports-single-port"),
        pytest.param(ONLY_10, ["--to-ports=1024-29999,32768-65535", "--random-fully=false"],
                     "to_ports_two_ranges_no_random_fully", id="to-ports-no-random-fully"),
        pytest.param(None, ["--v=2", "--logtostderr"], "defaults", id="klog-flags"),
        pytest.param(None, ["-v=2", "-logtostderr=true"], "defaults", id="klog-flags-single-dash"),
        pytest.param(None, ["--v", "4", "--logtostderr=false"], "defaults", id="klog-flags-space"),
    ],
)
def test_render_prints_golden_text(capsys, write, missing, config_text, flags, name):
    path = missing if config_text is None else write(config_text)
    assert main(["render", "--backend", "dry-run", "--config", path, *flags]) == 0
    out, err = capsys.readouterr()
    assert out == golden(name)
    assert err == ("" if config_text is not None else f"warning: {path}: {MISSING_NOTE}\n")


def test_render_invalid_config_exits_1_and_prints_no_rules(capsys, write):
    path = write("nonMasqueradeCIDRs: [10.0.0.0/8 -j ACCEPT]\n")
    assert main(["render", "--backend", "dry-run", "--config", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: {path}: nonMasqueradeCIDRs[0]: '10.0.0.0/8 -j ACCEPT': not a CIDR: expected an IPv4 or IPv6 "
        "address, '/', and a prefix length, e.g. '10.0.0.0/8' or 'fd00::/8'"
    ]


# --- bad command lines ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        pytest.param(["--random-fully=maybe"], "--random-fully", id="bool-word"),
        pytest.param(["--enable-ipv6=yes"], "--enable-ipv6", id="bool-yes-is-not-go"),
        pytest.param(["--nomasq-all-reserved-ranges=2"], "--nomasq-all-reserved-ranges", id="bool-number"),
        pytest.param(["--v=abc"], "--v", id="verbosity-not-int"),
        pytest.param(["--to-ports=70000"], "--to-ports", id="port-too-big"),
        pytest.param(["--to-ports", "2000-1000"], "--to-ports", id="reversed-range"),
        pytest.param(["--to-ports=1000-2000,1500-2500"], "overlap", id="overlapping-ranges"),
        pytest.param(["--masq-chain=POSTROUTING"], "--masq-chain", id="builtin-chain"),
        pytest.param(["-masq-chain=bad name"], "--masq-chain", id="chain-with-space"),
        pytest.param(["--masq-chain="], "--masq-chain", id="empty-chain"),
        pytest.param(["--backend=nft-legacy"], "--backend", id="unknown-backend"),
        pytest.param(["--no-such-flag"], "--no-such-flag", id="unknown-flag"),
        pytest.param(["--masq-ch=X"], "--masq-ch", id="abbreviation-not-accepted"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "render", "run"])
def test_bad_flag_value_exits_2(capsys, missing, command, flags, mentions):
    assert exit_code([command, "--config", missing, "--backend", "dry-run", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert mentions in err


def test_no_command_exits_2(capsys):
    assert exit_code([]) == 2


# --- run and the ip-masq-agent alias --------------------------------------------------------------


def _json_events(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_run_once_dry_run_exits_0_and_logs_the_rules(capsys):
    argv = ["run", "--once", "--backend", "dry-run", "--config", str(EXAMPLE), "--log-format", "json"]
    assert main(argv) == 0
    events = _json_events(capsys.readouterr().err)
    (applied,) = [e for e in events if e["event"] == "dry-run: would apply"]
    assert '-A IP-MASQ-AGENT -d 198.51.100.0/24 -m comment --comment "ip-masq-agent: local traffic is not subject ' \
           'to MASQUERADE" -j RETURN' in applied["rules"].splitlines()


def test_run_once_invalid_config_exits_1_with_problem_on_stderr(capsys, write):
    path = write("nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    assert main(["run", "--once", "--backend", "dry-run", "--config", path, "--log-format", "json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        f"error: {path}: nonMasqueradeCIDRs[0]: '10.0.0.1/8': not aligned to a CIDR block: host bits are set; "
        "did you mean '10.0.0.0/8'?"
    ) in err.splitlines()
    assert not [e for e in _json_events(err) if e["event"] == "dry-run: would apply"]


def test_ip_masq_agent_help_lists_upstream_flags(capsys):
    assert exit_code(["--help"], ip_masq_agent_main) == 0
    out = capsys.readouterr().out
    for flag in ("--masq-chain", "--nomasq-all-reserved-ranges", "--enable-ipv6", "--random-fully", "--to-ports",
                 "--v", "--logtostderr"):
        assert flag in out


def test_ip_masq_agent_runs_with_upstream_manifest_flags(capsys):
    argv = ["--once", "--backend", "dry-run", "--config", str(EXAMPLE),
            "--masq-chain=IP-MASQ-AGENT", "--nomasq-all-reserved-ranges", "--v=2", "--logtostderr",
            "--log-format", "json"]
    assert ip_masq_agent_main(argv) == 0


def test_ip_masq_agent_bad_flag_exits_2(capsys):
    assert exit_code(["--once", "--backend", "dry-run", "--random-fully=perhaps"], ip_masq_agent_main) == 2


# --- the installed console scripts ----------------------------------------------------------------


def _script(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path is not None, f"console script {name!r} is not installed"
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_installed_masqd_render_and_run(missing):
    masqd = _script("masqd")
    rendered = _run(masqd, "render", "--backend", "dry-run", "--config", missing)
    assert (rendered.returncode, rendered.stdout) == (0, golden("defaults"))

    ran = _run(masqd, "run", "--once", "--backend", "dry-run", "--config", "examples/config.yaml")
    assert ran.returncode == 0, ran.stderr


def test_installed_masqd_run_once_invalid_config(write):
    path = write("nonMasqueradeCIDRs: [10.0.0.1/8]\nmasqLinkLocal: maybe\n")
    ran = _run(_script("masqd"), "run", "--once", "--backend", "dry-run", "--config", path)
    assert ran.returncode == 1
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {path}: nonMasqueradeCIDRs[0]: '10.0.0.1/8': not aligned to a CIDR block: host bits are set; "
        "did you mean '10.0.0.0/8'?",
        f"error: {path}: masqLinkLocal: 'maybe': expected true or false",
    ]


def test_installed_ip_masq_agent_help_and_once():
    agent = _script("ip-masq-agent")
    helped = _run(agent, "--help")
    assert helped.returncode == 0
    assert "--nomasq-all-reserved-ranges" in helped.stdout

    ran = _run(agent, "--once", "--backend", "dry-run", "--config", "examples/config.yaml", "-v=2", "-logtostderr")
    assert ran.returncode == 0, ran.stderr

    bad = _run(agent, "--once", "--backend", "dry-run", "--to-ports=0")
    assert bad.returncode == 2
    assert "--to-ports" in bad.stderr


@pytest.mark.parametrize(
    ("example", "flags", "summary"),
    [
        pytest.param("config.yaml", [], "4 non-masquerade CIDRs, resyncInterval 1m0s", id="yaml"),
        pytest.param("config.json", ["--enable-ipv6"], "4 non-masquerade CIDRs, resyncInterval 1m30s", id="json-ipv6"),
    ],
)
def test_shipped_examples_are_valid(capsys, example, flags, summary):
    assert main(["validate", "--config", str(ROOT / "examples" / example), *flags]) == 0
    out = capsys.readouterr()
    assert summary in out.out and out.err == ""


def test_json_example_needs_enable_ipv6(capsys):
    assert main(["validate", "--config", str(ROOT / "examples" / "config.json")]) == 1
    assert "nonMasqueradeCIDRs[3]: 'fd00::/8': IPv6 CIDR given but IPv6 is not enabled" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_render_stdout_holds_only_the_rules_so_it_can_be_piped(backend):
    """`masqd render | iptables-restore` (or `| nft -f -`): logs, even debug ones, go to stderr."""
    masqd = Path(sys.executable).with_name("masqd")
    ran = subprocess.run([str(masqd), "render", "--backend", backend, "--config", str(EXAMPLE), "--v=4"],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    first = ran.stdout.splitlines()[0]
    assert first == ("# iptables-restore --noflush" if backend == "iptables" else "add table ip masqd")
    assert not any(line.lstrip().startswith("{") for line in ran.stdout.splitlines())


def test_flags_without_a_command_mean_run_as_upstream_manifests_pass_them(tmp_path, capsys):
    """An upstream DaemonSet passes only flags (its image's entrypoint is the agent): with the
    image swapped, ``masqd --masq-chain=X ...`` must run the agent, not fail on a missing command."""
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    code = main(["--masq-chain=UPSTREAM", "--backend", "dry-run", "--config", str(config), "--once",
                 "--log-format", "json"])
    assert code == 0
    assert ":UPSTREAM - [0:0]" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--version"], ["-version"]], ids=["--version", "-version"])
def test_version_is_still_the_version(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0 and capsys.readouterr().out.startswith("masqd ")


# --- first contact (issue 18): a missing path, stdin, duplicate keys, plain messages ----------------


MISSING_NOTE = "no such file; the defaults apply (a missing config file is allowed, as for an optional ConfigMap)"


@pytest.mark.parametrize("command", [["validate"], ["render", "--backend", "dry-run"], ["explain", "8.8.8.8"]])
def test_a_missing_config_file_is_named_in_a_warning(capsys, missing, command):
    assert main([*command, "--config", missing]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == f"warning: {missing}: {MISSING_NOTE}"
    assert missing not in out  # render's stdout stays exactly the script


def test_a_missing_file_next_to_a_present_one_contributes_nothing(capsys, missing):
    assert main(["validate", "--config", str(EXAMPLE), "--config", missing]) == 0
    out, err = capsys.readouterr()
    assert err == (f"warning: {missing}: no such file; it contributes nothing (a missing config file is allowed, "
                   "as for an optional ConfigMap)\n")
    assert out.startswith(f"ok: {EXAMPLE}: ")


def test_installed_validate_names_a_mistyped_path(tmp_path):
    ran = _run(_script("masqd"), "validate", "--config", "examples/confg.yaml")
    assert ran.returncode == 0
    assert ran.stderr == f"warning: examples/confg.yaml: {MISSING_NOTE}\n"


@pytest.mark.parametrize("command", [["validate"], ["render", "--backend", "dry-run"], ["explain", "10.1.2.3"]])
def test_config_dash_reads_stdin_once(command):
    ran = subprocess.run([str(_script("masqd")), *command, "--config", "-", "--config", "-"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, input="nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert ran.returncode == 0, ran.stderr
    assert "no such file" not in ran.stderr
    expected = {"validate": "ok: <stdin>: 1 non-masquerade CIDRs, resyncInterval 1m0s, cidrLimit 64\n",
                "render": golden("defaults").replace(
                    '-A IP-MASQ-AGENT -d 172.16.0.0/12 -m comment --comment "ip-masq-agent: local traffic is not '
                    'subject to MASQUERADE" -j RETURN\n-A IP-MASQ-AGENT -d 192.168.0.0/16 -m comment --comment '
                    '"ip-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN\n', ""),
                "explain": "10.1.2.3: keeps the pod source address (not masqueraded)\n"
                           "  matched 10.0.0.0/8 from <stdin> line 1\n"}
    assert ran.stdout == expected[command[0]]


def test_run_refuses_config_dash(capsys):
    assert main(["run", "--once", "--backend", "dry-run", "--config", "-"]) == 2
    assert capsys.readouterr().err == ("error: --config -: standard input is read by validate, render and explain; "
                                       "run needs a config file it can watch for changes\n")


@pytest.mark.parametrize("text, line", [
    ("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\nnonMasqueradeCIDRs:\n  - 192.168.0.0/16\n",
     "nonMasqueradeCIDRs: given twice, at lines 1 and 3: only the last (line 3) is used, as the upstream agent "
     "does; remove the others"),
    ('{"nonMasqueradeCIDRs": ["10.0.0.0/8"],\n "cidrLimit": 3,\n "nonMasqueradeCIDRs": ["192.168.0.0/16"]}\n',
     "nonMasqueradeCIDRs: given twice, at lines 1 and 3: only the last (line 3) is used, as the upstream agent "
     "does; remove the others"),
], ids=["yaml", "json"])
def test_validate_warns_about_a_repeated_key_and_keeps_the_last(capsys, write, text, line):
    path = write(text)
    assert main(["validate", "--config", path]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {path}: {line}\n"
    assert out.startswith(f"ok: {path}: 1 non-masquerade CIDRs")
    assert main(["render", "--backend", "dry-run", "--config", path]) == 0
    assert "-d 192.168.0.0/16" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("cidrLimit: 99999999999999999999999999999\n",
     "cidrLimit: 99999999999999999999999999999: must be from 0 to 9223372036854775807 (2^63-1, the largest 64-bit "
     "signed integer)"),
    ("nonMasqueradeCIDRs:\n\t- 10.0.0.0/8\n",
     "<line 2, column 1>: '\\t- 10.0.0.0/8': not valid YAML or JSON: a tab at line 2, column 1: tabs cannot indent "
     "YAML (nor start a value); use spaces"),
    ("nonMasqueradeCIDRs: [10.0.0.0/8\n",
     "<line 1, column 21>: 'nonMasqueradeCIDRs: [10.0.0.0/8': not valid YAML or JSON: a [ list opened at line 1, "
     "column 21 is never closed: add ']' after its last item"),
    ("nonMasqueradeCIDRs: [10.0.0.0/8\ncidrLimit: 3\n",
     "<line 1, column 21>: 'nonMasqueradeCIDRs: [10.0.0.0/8': not valid YAML or JSON: a [ list opened at line 1, "
     "column 21 is not closed: at line 2, column 10 a ',' or ']' was expected; close it with ']' after its last "
     "item"),
    ("x: {a: 1\n", "<line 1, column 4>: 'x: {a: 1': not valid YAML or JSON: a { mapping opened at line 1, column 4 "
                   "is never closed: add '}' after its last item"),
], ids=["cidr-limit", "tab", "unclosed-list", "unclosed-list-then-more", "unclosed-mapping"])
def test_validate_says_plainly_what_is_wrong(capsys, write, text, message):
    path = write(text)
    assert main(["validate", "--config", path]) == 1
    assert capsys.readouterr().err == f"error: {path}: {message}\n"


@pytest.mark.parametrize("value, message", [
    ("70000", "argument --to-ports: '70000': ports must be 1-65535 with the first not above the last"),
    ("x", "argument --to-ports: 'x': not a port or a range; expected e.g. '1024-29999,32768-65535'"),
])
def test_to_ports_error_names_the_value_once(capsys, missing, value, message):
    assert exit_code(["validate", "--config", missing, "--to-ports", value]) == 2
    assert f"masqd validate: error: {message}\n" in capsys.readouterr().err


# --- first contact (issue 18): each command's own help, and errors that point at the mistake --------


def help_of(capsys, *argv: str) -> tuple[str, list[str]]:
    """``masqd ARGV --help``: the text, and the long flags it lists (in order)."""
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    flags = [line.split()[0].rstrip(",") for line in out.splitlines() if line.startswith("  --")]
    return out, flags


LOGGING = ["--v", "--log-format"]


@pytest.mark.parametrize("command, flags", [
    ("plugins", ["--disable-plugin", *LOGGING]),
    ("cleanup", ["--backend", "--iptables-mode", "--masq-chain", "--disable-plugin", *LOGGING]),
])
def test_plugins_and_cleanup_help_lists_only_their_own_flags(capsys, command, flags):
    _, shown = help_of(capsys, command)
    assert shown == flags


@pytest.mark.parametrize("command, description, codes", [
    ("run", "Run the agent: keep the kernel's masquerade rules", "0 1 2 3 4"),
    ("validate", "Check the config sources as `run` with the same flags would read them", "0 1 2 4"),
    ("render", "Print the exact rules --backend would write", "0 1 2 4"),
    ("explain", "Say whether traffic to each ADDRESS keeps the pod address", "0 1 2 3 4 5"),
    ("cleanup", "Remove everything masqd created with --backend, IPv4 and IPv6", "0 2 3"),
    ("plugins", "List the loaded plugins", "0 2"),
    ("controller", "Cluster controller: translate EgressNATPolicy objects", "0 2"),
])
def test_each_command_help_has_a_description_and_its_exit_codes(capsys, command, description, codes):
    out, _ = help_of(capsys, command)
    assert f"\n\n{description}" in out
    exit_section = out.split("\nexit codes:\n", 1)[1]
    listed = [line.split()[0] for line in exit_section.splitlines() if line.startswith("  ") and line[2].isdigit()]
    assert listed == codes.split()


def test_validate_help_leaves_out_the_backend_settings_it_never_uses(capsys):
    _, validate = help_of(capsys, "validate")
    _, run = help_of(capsys, "run")
    assert set(run) - set(validate) == {"--iptables-mode", "--postrouting-jump", "--nftables-priority", "--once",
                                        "--http-address", "--drift-check-interval", "--conntrack-reconcile"}


def test_cleanup_still_takes_the_run_flags_it_ignores_unlisted(capsys, missing):
    """Scripts run ``masqd cleanup --backend X --config PATH --enable-ipv6`` (as the kernel tests
    do): those keep working though the help no longer lists them."""
    _, shown = help_of(capsys, "cleanup")
    assert "--config" not in shown and "--enable-ipv6" not in shown
    assert main(["cleanup", "--backend", "dry-run", "--config", missing, "--enable-ipv6", "-masq-chain=X"]) == 0


@pytest.mark.parametrize("argv, err", [
    (["run", "--backnd", "dry-run"],
     "masqd run: error: unknown flag --backnd; did you mean --backend?\nsee 'masqd run --help'\n"),
    (["validte"], "masqd: error: unknown command 'validte'; did you mean 'validate'?\nsee 'masqd --help'\n"),
    (["frobnicate"], "masqd: error: unknown command 'frobnicate'; the commands are run, validate, render, explain, "
                     "cleanup, plugins, controller\nsee 'masqd --help'\n"),
    (["--backnd", "dry-run"],  # flags without a command mean run: so does the error
     "masqd run: error: unknown flag --backnd; did you mean --backend?\nsee 'masqd run --help'\n"),
    (["-masq-chian=X"], "masqd run: error: unknown flag -masq-chian; did you mean --masq-chain?\n"
                        "see 'masqd run --help'\n"),
    (["explain", "--lve", "10.0.0.1"],
     "masqd explain: error: unknown flag --lve; did you mean --live?\nsee 'masqd explain --help'\n"),
    (["plugins", "--masq-chain", "X"],
     "masqd plugins: error: unknown flag --masq-chain: masqd plugins does not take it (a flag of run, validate, "
     "render, explain, cleanup)\nsee 'masqd plugins --help'\n"),
    (["render", "extra"], "masqd render: error: unexpected argument 'extra'\nsee 'masqd render --help'\n"),
    (["controller", "--confgmap", "kube-system/ip-masq-agent"],  # the typo, not the required flag it hides
     "masqd controller: error: unknown flag --confgmap; did you mean --configmap?\nsee 'masqd controller --help'\n"),
], ids=["run-flag-typo", "command-typo", "unknown-command", "bare-flag-typo", "go-flag-typo", "explain-flag-typo",
        "flag-of-another-command", "stray-argument", "typo-hiding-a-required-flag"])
def test_a_command_line_mistake_is_reported_reason_first_by_its_command(capsys, argv, err):
    assert exit_code(argv) == 2
    assert capsys.readouterr() == ("", err)


def test_a_bad_flag_value_leads_with_the_reason_not_the_usage(capsys):
    assert exit_code(["run", "--to-ports", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "masqd run: error: argument --to-ports: 'x': not a port or a range; expected e.g. '1024-29999,32768-65535'",
        "see 'masqd run --help'",
    ]


def test_ip_masq_agent_flag_typo_names_the_alias(capsys):
    assert exit_code(["--once", "--backnd", "dry-run"], ip_masq_agent_main) == 2
    assert capsys.readouterr().err == ("ip-masq-agent: error: unknown flag --backnd; did you mean --backend?\n"
                                       "see 'ip-masq-agent --help'\n")


def test_installed_masqd_flag_typo():
    ran = _run(_script("masqd"), "run", "--backnd", "dry-run")
    assert (ran.returncode, ran.stdout, ran.stderr) == (
        2, "", "masqd run: error: unknown flag --backnd; did you mean --backend?\nsee 'masqd run --help'\n")
