"""masqd-cidr-files against masqd, through masqd's own test fixtures."""

from __future__ import annotations

import json
import os

import anyio
import pytest

from masqd.config import AgentOptions
from masqd_cidr_files import CidrFiles


def ranges_document(*entries) -> str:
    return json.dumps({"syncToken": "1", "prefixes": list(entries)})


def test_directory_files_are_added_in_name_order(tmp_path, masqd_dry_run):
    (tmp_path / "b-partners").write_text("198.51.100.0/24   # partner VPN\n\n# nothing here\n")
    (tmp_path / "a-onprem").write_text("192.0.2.0/25 192.0.2.128/25\n")
    (tmp_path / ".hidden").write_text("203.0.113.0/24\n")
    (tmp_path / "..data").mkdir()  # what a ConfigMap mount holds besides the keys
    result = masqd_dry_run(CidrFiles(tmp_path)).apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    assert result.error is None
    assert result.contributions == {"cidr-files": ["192.0.2.0/25", "192.0.2.128/25", "198.51.100.0/24"]}
    assert result.nonmasq[4] == ["169.254.0.0/16", "10.0.0.0/8", "192.0.2.0/25", "192.0.2.128/25", "198.51.100.0/24"]


def test_published_ranges_ipv6_only_with_ipv6_enabled(tmp_path, masqd_dry_run):
    doc = tmp_path / "cloud.json"
    doc.write_text(ranges_document({"ipv4Prefix": "203.0.113.0/24", "service": "x"}, {"ipv6Prefix": "2001:db8::/32"}))
    v4_only = masqd_dry_run(CidrFiles(documents=[doc])).apply(None)
    assert v4_only.contributions == {"cidr-files": ["203.0.113.0/24"]}
    dual = masqd_dry_run(CidrFiles(documents=[doc]), options=AgentOptions(enable_ipv6=True)).apply(None)
    assert dual.contributions == {"cidr-files": ["203.0.113.0/24", "2001:db8::/32"]}
    assert dual.nonmasq[6] == ["fe80::/10", "2001:db8::/32"]


@pytest.mark.parametrize(("content", "message"), [
    pytest.param("192.0.2.0/24\n10.0.0.1/8\n", "a-list:2: '10.0.0.1/8': not aligned", id="misaligned-line"),
    pytest.param("192.0.2.0/24 and more\n", "a-list:1: 'and'", id="words"),
])
def test_a_bad_line_keeps_the_last_good_rules_and_names_file_and_line(tmp_path, masqd_dry_run, content, message):
    listing = tmp_path / "a-list"
    listing.write_text("192.0.2.0/24\n")
    agent = masqd_dry_run(CidrFiles(tmp_path))
    assert agent.apply(None).error is None
    listing.write_text(content)
    result = agent.apply(None)
    assert result.error is not None and message in str(result.error)
    assert "cidr-files.nonmasq_cidrs" in str(result.error)
    assert result.nonmasq[4][-1] == "192.0.2.0/24"


@pytest.mark.parametrize(("document", "message"), [
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param(json.dumps({"prefixes": {}}), "'prefixes' list", id="prefixes-not-a-list"),
    pytest.param(ranges_document({"ip_prefix": "192.0.2.0/24"}), "prefixes[0]: expected an object with ipv4Prefix",
                 id="other-provider-shape"),
    pytest.param(ranges_document({"ipv4Prefix": "192.0.2.1/24"}), "prefixes[0]: '192.0.2.1/24': not aligned",
                 id="misaligned"),
])
def test_a_bad_ranges_document_is_reported(tmp_path, masqd_dry_run, document, message):
    doc = tmp_path / "ranges.json"
    doc.write_text(document)
    result = masqd_dry_run(CidrFiles(documents=[doc])).apply(None)
    assert result.error is not None and message in str(result.error)


def test_files_are_read_again_only_when_they_changed(tmp_path):
    listing = tmp_path / "list"
    listing.write_text("192.0.2.0/24\n")
    reads = []

    class Counting(CidrFiles):
        def _read(self, path, ipv6):
            reads.append(path.name)
            return super()._read(path, ipv6)

    plugin = Counting(tmp_path)
    options = AgentOptions()
    assert plugin.nonmasq_cidrs(options) == ["192.0.2.0/24"]
    assert plugin.nonmasq_cidrs(options) == ["192.0.2.0/24"]
    assert reads == ["list"]  # the second call read nothing
    listing.write_text("198.51.100.0/24\n")
    assert plugin.nonmasq_cidrs(options) == ["198.51.100.0/24"]
    assert reads == ["list", "list"]


def test_environment_configures_the_plugin(tmp_path):
    plugin = CidrFiles.from_environment({"MASQD_CIDR_FILES_DIR": str(tmp_path),
                                         "MASQD_CIDR_FILES_RANGES": f"{tmp_path}/a.json, {tmp_path}/b.json"})
    assert plugin.directory == tmp_path and [p.name for p in plugin.documents] == ["a.json", "b.json"]


async def test_its_source_asks_for_a_reconcile_when_a_file_changes(tmp_path):
    (tmp_path / "list").write_text("192.0.2.0/24\n")
    registered = []
    CidrFiles(tmp_path).register_sources(registered.append)
    (source,) = registered
    reasons = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.run, reasons.append)
        await anyio.sleep(0.2)  # let the watch start
        (tmp_path / "list").write_text("198.51.100.0/24\n")
        with anyio.fail_after(10):
            while not reasons:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert reasons[0] == "files changed"


def test_installed_entry_point_is_listed_by_masqd(capsys):
    from masqd.cli import main

    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cidr-files"))
    assert "(masqd-cidr-files 0.1.0)" in line and "nonmasq_cidrs" in line and "register_sources" in line


def test_masqd_render_names_the_plugin_and_writes_its_cidrs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cidrs = tmp_path / "cidrs"
    cidrs.mkdir()
    (cidrs / "partners").write_text("192.0.2.0/24\n")
    env = {**os.environ, "MASQD_PLUGINS": "cidr-files", "MASQD_CIDR_FILES_DIR": str(cidrs)}
    result = subprocess.run([str(Path(sys.executable).with_name("masqd")), "render", "--backend", "dry-run",
                             "--config", str(tmp_path / "absent")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "plugin cidr-files: 1 non-masquerade CIDRs: 192.0.2.0/24" in result.stderr
    assert "-A IP-MASQ-AGENT -d 192.0.2.0/24 -m comment" in result.stdout
    assert "plugin cidr-files" not in result.stdout  # stdout stays exactly the script


def test_explain_names_the_file_and_line_of_each_cidr(tmp_path, masqd_plugins):
    """``describe_cidrs``: what ``masqd explain`` shows after the plugin's name."""
    listing = tmp_path / "cidrs" / "partners"
    listing.parent.mkdir()
    listing.write_text("# partners\n198.51.100.0/24\n192.0.2.0/25 192.0.2.128/25  # two halves\n")
    doc = tmp_path / "cloud.json"
    doc.write_text(ranges_document({"ipv4Prefix": "203.0.113.0/24"}, {"ipv4Prefix": "198.51.100.0/24"}))
    plugins = masqd_plugins(CidrFiles(listing.parent, documents=[doc]))

    async def describe():
        contributions = await plugins.contributions(None, AgentOptions())
        return await plugins.describe_cidrs(contributions)

    (described, problems) = anyio.run(describe)
    assert problems == []
    texts = {str(net): [origin.detail for origin in origins] for net, origins in described["cidr-files"].items()}
    assert texts == {
        "198.51.100.0/24": [f"file {listing} line 2", f"{doc}: prefixes[1].ipv4Prefix"],
        "192.0.2.0/25": [f"file {listing} line 3"],
        "192.0.2.128/25": [f"file {listing} line 3"],
        "203.0.113.0/24": [f"{doc}: prefixes[0].ipv4Prefix"],
    }
