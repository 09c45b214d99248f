"""benchmarks/run_all.py: it runs every benchmark script, with flags the scripts accept, records a
failing or hanging one in the report and still runs the rest; and (as root) a ``--quick`` smoke
run of the whole set succeeds, so a benchmark that no longer runs is caught here. Nothing here
asserts a measured figure: the benchmarks print numbers, tests assert behaviour."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_run_all():
    spec = importlib.util.spec_from_file_location("benchmarks_run_all", BENCHMARKS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


run_all = _load_run_all()


def test_every_benchmark_script_is_in_run_all():
    """A new script in benchmarks/ must be added to run_all's list (or declared not a benchmark)."""
    scripts = {path.name for path in BENCHMARKS.glob("*.py")} - run_all.NOT_BENCHMARKS
    listed = {benchmark.script for benchmark in run_all.BENCHMARKS}
    assert listed == scripts
    assert all(benchmark.what and benchmark.full and benchmark.quick for benchmark in run_all.BENCHMARKS)


@pytest.mark.parametrize("script", sorted({b.script for b in run_all.BENCHMARKS}))
def test_run_all_passes_only_flags_the_script_accepts(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            cwd=BENCHMARKS, timeout=60)
    assert result.returncode == 0, result.stderr
    flags = {arg for b in run_all.BENCHMARKS if b.script == script for arg in (*b.full, *b.quick)
             if arg.startswith("--")}
    assert flags and all(flag in result.stdout for flag in flags), (flags, result.stdout)


def test_a_failing_or_hanging_benchmark_is_recorded_and_the_rest_still_run(tmp_path, capsys):
    def script(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(f"import sys, time\nprint('args', sys.argv[1:], flush=True)\n{body}\n")
        return str(path)

    benchmarks = (
        run_all.Benchmark("Fails", script("fails.py", "print('boom'); sys.exit(3)"), "a failing one", ("--a",), ("--b",)),
        run_all.Benchmark("Hangs", script("hangs.py", "time.sleep(120)"), "a hanging one", ("--a",), ("--b",)),
        run_all.Benchmark("Works", script("works.py", "print('figure 42')"), "a working one", ("--a",), ("--b",)),
    )
    report = tmp_path / "RESULTS.md"
    assert run_all.main(["--quick", "--timeout", "2", "--output", str(report)], benchmarks=benchmarks) == 1
    text = report.read_text()
    assert "Quick smoke run" in text and "## Machine" in text and "| Kernel |" in text
    assert "1 of 3 benchmarks succeeded; failed: Fails, Hangs." in text
    fails, hangs, works = (text.split(f"## {name}\n", 1)[1] for name in ("Fails", "Hangs", "Works"))
    assert "What it measures: a failing one" in fails and "FAILED: exit status 3" in fails and "boom" in fails
    assert "FAILED: still running after its time limit" in hangs and "SIGTERM" in hangs
    assert "Result: ok" in works and "figure 42" in works and "args ['--b']" in works  # the quick arguments
    assert "figure 42" in capsys.readouterr().out  # shown as it ran, too


@pytest.mark.netns
def test_quick_run_of_every_benchmark_succeeds(netns_supported, tmp_path):
    """The whole set, small: every script still runs against the current code."""
    report = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--output", str(report)],
                            capture_output=True, text=True, timeout=900)
    text = report.read_text()
    assert result.returncode == 0, text.split("## Summary", 1)[-1][:20000]
    assert f"{len(run_all.BENCHMARKS)} of {len(run_all.BENCHMARKS)} benchmarks succeeded." in text
