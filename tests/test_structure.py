"""The shape of the code that keeps it navigable: no import cycles, no module that has grown a
second concern, and a plugin boundary the core does not cross (see docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import masqd

PACKAGE = Path(masqd.__file__).parent
#: A module past this many lines has almost always grown a second concern: split it at the seam.
MAX_MODULE_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
        found[name.removesuffix(".__init__")] = path
    return found


def imported(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The masqd modules ``path`` imports, at module level or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in known), None)

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(filter(None, (resolve(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(filter(None, (resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, name, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_is_over_the_size_that_signals_a_second_concern():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: size for name, size in sizes.items() if size > MAX_MODULE_LINES} == {}


def test_only_the_plugin_loader_imports_the_default_plugins():
    """The core never names a built-in plugin: it knows them through the hooks, as any other (the
    loader names their modules as strings in DEFAULT_PLUGINS)."""
    graph = import_graph()
    importers = {name for name, targets in graph.items() if any(t.startswith("masqd.default_plugins") for t in targets)
                 and not name.startswith("masqd.default_plugins")}
    assert importers == set()


#: The pure core: config, CIDRs, the rule set, provenance and explain, policies, the controller's
#: translation, and every backend's rendering and read-back analysis.
PURE = ("masqd.cidrs", "masqd.ruleset", "masqd.duration", "masqd.config", "masqd.config.model", "masqd.config.parse",
        "masqd.config.merge", "masqd.config.flags", "masqd.provenance", "masqd.policies", "masqd.explain",
        "masqd.audit", "masqd.kube.settings", "masqd.controller.translation", "masqd.backends.base",
        "masqd.backends.iptables.render", "masqd.backends.iptables.live",
        "masqd.backends.iptables.incremental", "masqd.backends.nftables.render",
        "masqd.backends.nftables.live", "masqd.backends.nftables.monitor", "masqd.backends.nftables.netlink",
        "masqd.shadowing", "masqd.backends.services", "masqd.backends.iptables.services",
        "masqd.backends.nftables.services", "masqd.explain.services", "masqd.netlink", "masqd.flows",
        "masqd.backends.conntrack.messages", "masqd.backends.conntrack.listing")
#: What a pure module must not load, even through what it imports (its packages' __init__ included):
#: the event loop, processes, the API client, file watching, and masqd's own I/O modules.
IO_MODULES = ("anyio", "asyncio", "subprocess", "watchfiles", "lightkube", "httpx2", "masqd.backends.tools",
              "masqd.kube.client", "masqd.kube.reflector", "masqd.inputs", "masqd.reconcile")


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_nothing_that_does_io(module):
    """Imported alone in a fresh interpreter, a pure module (and everything it pulls in) loads no
    module that does I/O: it can be used, and tested, without an event loop, a kernel or an API."""
    probe = (f"import sys, {module}; print(' '.join(sorted(n for n in sys.modules if n in {IO_MODULES!r} "
             f"or n.split('.')[0] in {IO_MODULES!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"{module} loads {loaded}"


def test_no_test_module_imports_another():
    """What tests share lives in support modules (``tests/support.py``, ``tests/fake_nat.py``...),
    so each test module can be run, moved or deleted alone."""
    tests = Path(__file__).parent
    importers = {}
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(name.split(".")[0].startswith("test_") for name in names):
                importers.setdefault(path.name, []).extend(names)
    assert importers == {}


def test_no_test_prints_past_pytests_capture():
    """A test's numbers are printed into its captured output (``pytest -rP`` shows them), never
    past the capture, where they break the ``-q`` progress lines."""
    tests = Path(__file__).parent
    offenders = [path.name for path in sorted(tests.glob("*.py"))
                 if any(escape in path.read_text() for escape in ("capsys" ".disabled(", "sys.__std" "out__"))]
    assert offenders == []
