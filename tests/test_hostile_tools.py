"""Tools and files that misbehave (issue 19): what masqd reads must never surface as an internal
error, nor cost more than the work."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from masqd.backends.nftables.backend import NftablesBackend
from masqd.backends.nftables.executor import NftSubprocessExecutor
from masqd.config import AgentOptions, parse_config
from masqd.errors import ReadBackError
from masqd.reconcile import Reconciler
from masqd.ruleset import compute_ruleset
from masqd.sources.files import read_config_text

RULESET = compute_ruleset(parse_config("{}", AgentOptions()).config, AgentOptions())


def _fake_nft(tmp_path, output: str):
    """An ``nft`` that answers every command with ``output`` and exit 0 (a wrapper printing a
    banner, an nft that ignores ``--json``)."""
    script = tmp_path / "nft"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("output", [
    pytest.param("Warning: table ip masqd is managed by iptables-nft", id="a-banner"),
    pytest.param('{"nftables": [{"metainfo": {', id="truncated"),
    pytest.param("", id="nothing"),
])
async def test_nft_output_that_is_not_json_is_a_read_back_error_naming_the_command(tmp_path, output):
    backend = NftablesBackend(NftSubprocessExecutor(binary=_fake_nft(tmp_path, output)))
    with pytest.raises(ReadBackError) as caught:
        await backend.sync(RULESET)
    message = str(caught.value)
    assert "--json list table ip masqd" in message
    assert message.endswith(f"the output is not nft's JSON: {output!r}" if output else "no output"), message


async def test_through_the_reconciler_it_is_a_failed_sync_not_an_internal_error(tmp_path):
    config = tmp_path / "config"
    config.write_text("{}\n")
    backend = NftablesBackend(NftSubprocessExecutor(binary=_fake_nft(tmp_path, "not json")))
    reconciler = Reconciler(backend, AgentOptions(), config)
    with pytest.raises(ReadBackError):
        await reconciler.reconcile()
    assert "the output is not nft's JSON: 'not json'" in reconciler.status.sync_failure
    assert "internal error" not in reconciler.status.sync_failure


def test_reading_a_small_config_does_not_reserve_the_size_limit(tmp_path):
    """Every config read used to allocate MAX_CONFIG_BYTES (16 MiB) up front: under an
    address-space limit that was a MemoryError. A small file costs about its size."""
    config = tmp_path / "config"
    config.write_text("nonMasqueradeCIDRs: [10.0.0.0/8]\n" + "# padding\n" * 1000)
    tracemalloc.start()
    try:
        text = read_config_text(config)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert text is not None and text.startswith("nonMasqueradeCIDRs")
    assert peak < 1024 * 1024, f"reading a {os.path.getsize(config)}-byte file peaked at {peak} bytes"
