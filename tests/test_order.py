"""Where masqd's rules sit beside kube-proxy's (issue 17, part 2), pure: ``--nftables-priority``
and ``--postrouting-jump`` parsed, rendered, read back and repaired, against the in-memory nft
(:class:`~masqd.testing.fake_nft.FakeNft`) and nat table (``FakeNatKernel``). The real kernel,
with kube-proxy's rules and packets: ``tests/test_netns_order.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_nat import FakeNatKernel

from masqd.backends.iptables import IptablesBackend, jump_rule, parse_nat_state, plan_restore
from masqd.backends.iptables.render import APPEND, INSERT
from masqd.backends.nftables import NftablesBackend, parse_listing
from masqd.backends.nftables.render import DEFAULT_PRIORITY, parse_priority, priority_text
from masqd.cli import main
from masqd.cli.flags import build_parser
from masqd.config import AgentOptions, parse_config
from masqd.errors import FlagError
from masqd.ruleset import compute_ruleset
from masqd.testing.fake_nft import FakeNft

GOLDEN = Path(__file__).parent / "golden"
CHAIN = "IP-MASQ-AGENT"
JUMP = jump_rule(CHAIN)
KUBE_JUMP = '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'
OTHER = "-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE"


def ruleset(config: str | None = None, options: AgentOptions = AgentOptions()):
    return compute_ruleset(parse_config(config, options).config, options)


# --- --nftables-priority ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "priority"), [
    pytest.param("srcnat", 100, id="srcnat"),
    pytest.param("srcnat + 10", 110, id="srcnat-plus"),
    pytest.param("srcnat+10", 110, id="no-spaces"),
    pytest.param("srcnat - 5", 95, id="srcnat-minus"),
    pytest.param("srcnat-0", 100, id="minus-zero"),
    pytest.param("110", 110, id="integer"),
    pytest.param(" 300 ", 300, id="spaces-around"),
    pytest.param("-199", -199, id="earliest-nat-priority"),
    pytest.param("2147483647", 2**31 - 1, id="largest"),
])
def test_priority_parses(text, priority):
    assert parse_priority(text) == priority


@pytest.mark.parametrize(("text", "reason"), [
    pytest.param("-200", "from -199 (after conntrack)", id="conntrack-priority"),
    pytest.param("srcnat - 400", "is -300", id="offset-before-conntrack"),
    pytest.param("2147483648", "to 2147483647", id="past-int32"),
    pytest.param("dstnat", "expected an integer, srcnat", id="other-name"),
    pytest.param("srcnat + x", "expected an integer", id="bad-offset"),
    pytest.param("srcnat * 2", "expected an integer", id="bad-operator"),
    pytest.param("srcnat + 1 + 1", "expected an integer", id="two-offsets"),
    pytest.param("", "expected an integer", id="empty"),
    pytest.param("1e3", "expected an integer", id="float"),
])
def test_priority_refused(text, reason):
    with pytest.raises(FlagError) as caught:
        parse_priority(text)
    assert caught.value.flag == "nftables-priority" and reason in caught.value.reason


@pytest.mark.parametrize(("priority", "text"), [
    pytest.param(100, "srcnat"), pytest.param(110, "srcnat + 10"), pytest.param(95, "srcnat - 5"),
    pytest.param(90, "srcnat - 10"), pytest.param(111, "111"), pytest.param(89, "89"), pytest.param(-150, "-150"),
])
def test_priority_text_is_what_nft_list_prints(priority, text):
    # nft 1.0.6 names a priority within 10 of srcnat by it (tests/test_netns_order.py reads them back)
    assert priority_text(priority) == text
    assert parse_priority(text) == priority


def test_default_priority_is_after_srcnat():
    assert DEFAULT_PRIORITY == 110 and priority_text(DEFAULT_PRIORITY) == "srcnat + 10"


@pytest.mark.parametrize(("argv", "priority", "jump"), [
    pytest.param([], None, "append", id="defaults"),
    pytest.param(["--nftables-priority", "srcnat - 5"], 95, "append", id="separate-value"),
    pytest.param(["--nftables-priority=120"], 120, "append", id="equals"),
    pytest.param(["-nftables-priority=srcnat", "-postrouting-jump=insert"], 100, "insert", id="go-single-dash"),
    pytest.param(["--postrouting-jump", "append"], None, "append", id="append"),
])
def test_flags_parse(argv, priority, jump):
    from masqd.cli.flags import normalize_go_flags

    parser = build_parser()
    args = parser.parse_args(normalize_go_flags(["run", *argv], parser))
    assert (args.nftables_priority, args.postrouting_jump) == (priority, jump)


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--nftables-priority=-200"], "argument --nftables-priority: '-200': is -200", id="too-early"),
    pytest.param(["--nftables-priority=late"], "argument --nftables-priority: 'late': expected an integer",
                 id="word"),
    pytest.param(["--postrouting-jump=first"], "argument --postrouting-jump: invalid choice: 'first'", id="jump"),
])
def test_bad_flag_values_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(["render", "--backend", "nftables", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# --- nftables: rendered, read back, repaired ---------------------------------------------------------


@pytest.mark.parametrize(("argv", "printed"), [
    pytest.param([], "srcnat + 10", id="default"),
    pytest.param(["--nftables-priority=srcnat"], "srcnat", id="srcnat"),
    pytest.param(["--nftables-priority", "srcnat - 5"], "srcnat - 5", id="before-srcnat"),
    pytest.param(["--nftables-priority=300"], "300", id="number"),
])
def test_render_writes_the_priority(tmp_path, capsys, argv, printed):
    golden = (GOLDEN / "nftables" / "defaults.txt").read_text()
    assert main(["render", "--backend", "nftables", "--config", str(tmp_path / "absent"), *argv]) == 0
    out = capsys.readouterr().out
    assert out == golden.replace("priority srcnat + 10;", f"priority {printed};")
    assert out.count(f"type nat hook postrouting priority {printed}; policy accept;") == 1


def test_the_iptables_backend_ignores_the_priority_and_the_nftables_backend_the_jump(tmp_path, capsys):
    config = str(tmp_path / "absent")
    assert main(["render", "--config", config, "--nftables-priority=srcnat"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "iptables" / "defaults.txt").read_text()
    assert main(["render", "--backend", "nftables", "--config", config, "--postrouting-jump=insert"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "nftables" / "defaults.txt").read_text()


async def test_a_table_at_another_priority_is_rewritten_and_read_back_names_it():
    nft = FakeNft()
    rules = ruleset()
    before = NftablesBackend(nft, priority=95)
    await before.sync(rules)
    assert parse_listing(nft.listing("ip"), 4).chain == ("nat", "postrouting", 95, "accept")

    backend = NftablesBackend(nft)  # the default priority
    live = (await backend.read_back(rules)).family(4)
    assert live.unexpected == ("chain nat at priority 95, masqd writes srcnat + 10 (110)",)
    assert live.drift == "table ip masqd: chain priority (95, masqd writes 110) differ"
    result = await backend.sync(rules)
    assert result.reasons == ("table ip masqd: chain priority (95, masqd writes 110) differ",)
    assert parse_listing(nft.listing("ip"), 4).chain == ("nat", "postrouting", 110, "accept")
    assert not (await backend.sync(rules)).changed
    assert (await backend.read_back(rules)).in_sync


async def test_other_nat_chains_are_placed_against_the_configured_priority():
    nft = FakeNft()
    where = {"family": "ip", "table": "kube-proxy"}
    nft.load_listing(json.dumps({"nftables": [
        {"table": {"family": "ip", "name": "kube-proxy", "handle": 1}},
        {"chain": {**where, "name": "nat-postrouting", "handle": 1, "type": "nat", "hook": "postrouting",
                   "prio": 100, "policy": "accept"}},
        {"rule": {**where, "chain": "nat-postrouting", "handle": 2, "expr": [{"masquerade": None}]}},
    ]}))
    for priority, stage in ((None, "before"), (100, "before"), (95, "after")):
        backend = NftablesBackend(nft, priority=priority)
        await backend.sync(ruleset())
        (other,) = (await backend.read_back(ruleset())).family(4).foreign
        assert (other.text, other.stage) == ("table ip kube-proxy chain nat-postrouting priority 100", stage)


# --- iptables: --postrouting-jump --------------------------------------------------------------------


def test_insert_renders_the_jump_first_and_append_is_upstreams_text(tmp_path, capsys):
    golden = (GOLDEN / "iptables" / "defaults.txt").read_text()
    config = str(tmp_path / "absent")
    assert main(["render", "--config", config, "--postrouting-jump=append"]) == 0
    assert capsys.readouterr().out == golden
    assert main(["render", "--config", config, "--postrouting-jump=insert"]) == 0
    assert capsys.readouterr().out == golden.replace("\n-A POSTROUTING ", "\n-I POSTROUTING 1 ")


def nat(*postrouting: str, chain_rules: tuple[str, ...] = ()) -> str:
    lines = ["*nat", ":POSTROUTING ACCEPT [0:0]", f":{CHAIN} - [0:0]", ":KUBE-POSTROUTING - [0:0]",
             *postrouting, *chain_rules, "COMMIT"]
    return "\n".join(lines) + "\n"


INSERTED = "-I POSTROUTING 1" + JUMP[len("-A POSTROUTING"):]
DELETE = "-D" + JUMP[2:]


@pytest.mark.parametrize(("postrouting", "placement", "writes", "reason"), [
    pytest.param((KUBE_JUMP, JUMP), APPEND, None, "in sync", id="append-after-kube"),
    pytest.param((JUMP,), APPEND, None, "in sync", id="append-alone"),
    pytest.param((JUMP, OTHER), APPEND, None, "in sync", id="append-before-others-is-not-moved"),
    pytest.param((JUMP, KUBE_JUMP), APPEND, [DELETE, JUMP],
                 "POSTROUTING jump comes before the one to KUBE-POSTROUTING (--postrouting-jump=append)",
                 id="append-before-kube-moves"),
    pytest.param((JUMP, KUBE_JUMP, JUMP), APPEND, [DELETE, DELETE, JUMP],
                 "POSTROUTING jump count 2, want 1; POSTROUTING jump comes before the one to KUBE-POSTROUTING "
                 "(--postrouting-jump=append)", id="append-two-one-before-kube"),
    pytest.param((KUBE_JUMP, JUMP, JUMP), APPEND, [DELETE], "POSTROUTING jump count 2, want 1",
                 id="append-two-after-kube-keeps-one"),
    pytest.param((JUMP, KUBE_JUMP), INSERT, None, "in sync", id="insert-first"),
    pytest.param((KUBE_JUMP, JUMP), INSERT, [DELETE, INSERTED],
                 "POSTROUTING jump is not the first rule (--postrouting-jump=insert)", id="insert-after-kube-moves"),
    pytest.param((KUBE_JUMP,), INSERT, [INSERTED], "POSTROUTING jump count 0, want 1", id="insert-missing"),
    pytest.param((JUMP, KUBE_JUMP, JUMP), INSERT, [DELETE, DELETE, INSERTED], "POSTROUTING jump count 2, want 1",
                 id="insert-two-first-kept-by-moving-both"),
])
def test_the_jump_is_kept_where_the_flag_says(postrouting, placement, writes, reason):
    desired = ("-A IP-MASQ-AGENT -j MASQUERADE",)
    state = parse_nat_state(nat(*postrouting, chain_rules=desired), CHAIN)
    text, why = plan_restore(desired, state, CHAIN, placement)
    assert why == reason
    if writes is None:
        assert text is None
    else:
        assert text == "\n".join(["*nat", f":{CHAIN} - [0:0]", *desired, *writes, "COMMIT"]) + "\n"


async def test_a_chain_edit_does_not_leave_a_jump_in_the_wrong_place():
    """A config edit of a chain this backend knows is an edit in place: not when the jump moved,
    which a rewrite of the whole chain (and the jump) then puts back."""
    kernel = FakeNatKernel()
    kernel.chains[4]["KUBE-POSTROUTING"] = ["-A KUBE-POSTROUTING -j MASQUERADE"]
    backend = IptablesBackend(kernel, random_fully_supported=True, jump=INSERT)
    await backend.sync(ruleset("nonMasqueradeCIDRs: [10.0.0.0/8]\n"))
    assert kernel.chains[4]["POSTROUTING"] == [JUMP]
    kernel.chains[4]["POSTROUTING"].insert(0, KUBE_JUMP)  # kube-proxy (re)starts, prepends its jump
    result = await backend.sync(ruleset("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n"))
    assert kernel.chains[4]["POSTROUTING"] == [JUMP, KUBE_JUMP]
    assert "POSTROUTING jump is not the first rule" in result.reasons[0]
    assert "-A IP-MASQ-AGENT -d 192.0.2.0/24" in "\n".join(kernel.chain())
    live = (await backend.read_back(ruleset("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n"))).family(4)
    assert live.drift is None and live.unexpected == ()
    assert [(rule.stage, rule.text) for rule in live.foreign] == [("after", KUBE_JUMP)]


def test_the_dry_run_backend_renders_the_jump_where_the_iptables_backend_would_put_it():
    from masqd.backends.base import BackendSettings
    from masqd.plugins import Plugins

    plugins = Plugins.load(entry_points=False)
    ruleset = compute_ruleset(parse_config("{}", AgentOptions()).config, AgentOptions())
    for placement, first in (("append", "-A POSTROUTING"), ("insert", "-I POSTROUTING 1")):
        backend = plugins.make_backend("dry-run", BackendSettings(AgentOptions(), postrouting_jump=placement))
        [jump] = [line for line in backend.render(ruleset).splitlines() if "POSTROUTING" in line]
        assert jump.startswith(first + " -m comment"), placement
