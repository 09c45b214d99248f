"""masqd-audit-log against masqd, through masqd's own test fixtures."""

from __future__ import annotations

import json
import threading

from masqd.audit import AuditEvent
from masqd_audit_log import AuditLog


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_apply_attempt(tmp_path, masqd_dry_run):
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    agent = masqd_dry_run(log)
    agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    agent.apply("nonMasqueradeCIDRs: [10.0.0.0/8]\n")
    agent.apply("nonMasqueradeCIDRs: [192.0.2.0/24]\n")
    agent.apply("nonMasqueradeCIDRs: [10.0.0.1/8]\n")
    assert log.flush()
    records = lines(tmp_path / "audit" / "audit.jsonl")
    assert [r["result"] for r in records] == ["applied", "unchanged", "applied", "rejected"]
    assert records[2]["added"] == {"ipv4": ["192.0.2.0/24"]} and records[2]["removed"] == {"ipv4": ["10.0.0.0/8"]}
    assert records[2]["backend"] == "dry-run" and records[2]["written"] == ["ipv4"]
    assert "10.0.0.1/8" in records[3]["error"]
    assert all(isinstance(r["time"], float) for r in records)


def event(n: int) -> AuditEvent:
    return AuditEvent(time=float(n), trigger="timer", backend="dry-run", result="unchanged")


def test_rotates_by_size_and_keeps_the_configured_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=400, backups=2)
    for n in range(40):
        log.audit(event(n))
    assert log.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 400
    newest, older = lines(path), lines(tmp_path / "audit.jsonl.1")
    assert newest[-1]["time"] == 39.0 and older[-1]["time"] == newest[0]["time"] - 1  # nothing lost between


def test_the_hook_never_waits_for_the_disk(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "audit.jsonl", queue_size=5)
    stalled = threading.Event()
    append = log._append

    def stalled_disk(line):
        stalled.wait()
        append(line)

    monkeypatch.setattr(log, "_append", stalled_disk)  # a disk that hangs until the test lets go
    for n in range(20):
        log.audit(event(n))  # returns although nothing can be written: a blocked hook never would
    assert log.dropped > 0
    stalled.set()
    assert log.flush()
    records = lines(tmp_path / "audit.jsonl")
    assert records[0]["time"] == 0.0 and any("dropped_before" in r for r in records)
    assert len(records) + sum(r.get("dropped_before", 0) for r in records) == 20


def test_a_write_error_is_reported_once_and_writing_resumes(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.jsonl")
    log.audit(event(1))
    log.audit(event(2))
    assert log.flush()
    assert capsys.readouterr().err.count("masqd audit-log: cannot write") == 1
    blocker.unlink()
    log.audit(event(3))
    assert log.flush()
    assert [r["time"] for r in lines(blocker / "audit.jsonl")] == [3.0]


def test_environment_configures_the_plugin(tmp_path):
    log = AuditLog.from_environment({"MASQD_AUDIT_LOG": str(tmp_path / "a.jsonl"), "MASQD_AUDIT_LOG_MAX_BYTES": "1000",
                                     "MASQD_AUDIT_LOG_BACKUPS": "3"})
    assert (log.path, log.max_bytes, log.backups) == (tmp_path / "a.jsonl", 1000, 3)


def test_registered_hooks(masqd_plugins):
    plugins = masqd_plugins(AuditLog("/nonexistent/audit.jsonl"))
    (info,) = [i for i in plugins.describe() if i.name == "audit-log"]
    assert info.hooks == ("audit",)


def test_without_a_path_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = AuditLog.from_environment({})
    log.audit(event(1))
    assert log.path is None and log.flush() and list(tmp_path.iterdir()) == []
