"""What a person sees first: the console log format (``--log-format console``, the default at a
terminal) shows the dry-run rules as lines and then what changed, lists as ``a,b``; ``render``
keeps stderr empty; the start-up line names where the rules go. JSON lines are unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from support import NO_RESYNC, agent, write_atomically

from masqd.backends import iptables_mode
from masqd.backends.nftables import NftablesBackend
from masqd.backends.nftables.render import TABLE
from masqd.cli import main
from masqd.testing import netns, running
from masqd.testing.fake_nft import FakeNft

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
MASQD = Path(sys.executable).with_name("masqd")
WAIT = 20  # seconds of silence before a test gives up on the process it started (a failure)
RETURN_198 = ('-A IP-MASQ-AGENT -d 198.51.100.0/24 -m comment --comment "ip-masq-agent: local traffic is not '
              'subject to MASQUERADE" -j RETURN')
RETURN_203 = RETURN_198.replace("198.51.100.0/24", "203.0.113.0/24")


def test_run_once_console_shows_the_rules_as_lines_and_lists_plainly() -> None:
    ran = subprocess.run([str(MASQD), "run", "--once", "--backend", "dry-run", "--config", str(EXAMPLE),
                          "--log-format", "console"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stderr.splitlines()
    (event,) = [i for i, line in enumerate(lines) if "dry-run: would apply" in line]
    assert "rules=" not in lines[event] and "\\n" not in ran.stderr
    block = lines[event + 1:event + 13]
    assert block[0] == "    rules:"
    assert block[1:4] == ["      # iptables-restore --noflush", "      *nat", "      :IP-MASQ-AGENT - [0:0]"]
    assert f"      {RETURN_198}" in block and block[-1] == "      COMMIT"
    (applied,) = [line for line in lines if "rules applied" in line]
    assert "cidrs_added=10.0.0.0/8,169.254.0.0/16,172.16.0.0/12,192.168.0.0/16,198.51.100.0/24" in applied
    assert "written=ipv4" in applied and "cidrs_removed=none" in applied
    assert "['" not in ran.stderr and "[]" not in ran.stderr


def _block_after(lines: netns.LineReader, needle: str) -> list[str]:
    """The indented lines under the first log line containing ``needle`` (fails after WAIT s of silence)."""
    while (line := lines.readline(WAIT)) is not None:
        if needle in line:
            break
    else:
        pytest.fail(f"masqd never logged {needle!r}")
    block = []
    while (line := lines.readline(WAIT)) is not None and line.startswith("    "):
        block.append(line)
    return block


def test_daemon_console_shows_what_an_edit_changed(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n")
    proc = subprocess.Popen([str(MASQD), "run", "--backend", "dry-run", "--config", str(config), "--http-address=",
                             "--log-format", "console"], stderr=subprocess.PIPE)
    lines = netns.LineReader(proc.stderr)
    try:
        first = _block_after(lines, "dry-run: would apply")
        assert first[0] == "    rules:" and f"      {RETURN_198}" in first
        write_atomically(config, NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
        assert _block_after(lines, "dry-run: would apply") == [
            "    rules (changed lines):", f"      - {RETURN_198}", f"      + {RETURN_203}"]
    finally:
        proc.kill()
        proc.wait()
        lines.close()


def test_render_as_root_prints_the_script_and_nothing_on_stderr() -> None:
    ran = subprocess.run([str(MASQD), "render", "--config", str(EXAMPLE)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert ran.returncode == 0 and ran.stderr == ""
    assert ran.stdout.startswith("# iptables-restore --noflush\n")


@pytest.mark.parametrize("verbosity", [[], ["--v=4"]], ids=["default", "debug"])
def test_render_does_not_warn_about_the_variant_it_assumes(monkeypatch, capsys, verbosity) -> None:
    """As a user other than root with both iptables variants installed, the probe assumes nft and
    would warn: during render that is debug, not a warning."""
    monkeypatch.setattr(iptables_mode, "installed_modes", lambda: ["legacy", "nft"])
    monkeypatch.setattr(iptables_mode, "legacy_readable", lambda: False)
    assert main(["render", "--config", str(EXAMPLE), "--log-format", "json", *verbosity]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("# iptables-restore --noflush\n")
    events = [json.loads(line) for line in err.splitlines()]
    assert {e["level"] for e in events} <= {"debug"}
    assert bool(verbosity) == any(e["event"] == "iptables variant chosen" for e in events)


async def test_nftables_start_up_line_names_the_table_not_a_chain(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(NO_RESYNC + "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    with structlog.testing.capture_logs() as logs:
        async with running(agent(NftablesBackend(FakeNft()), config, drift_check_interval=0)):
            pass
    (starting,) = [e for e in logs if e["event"] == "masqd starting"]
    assert starting["table"] == TABLE and "chain" not in starting
