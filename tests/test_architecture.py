"""The package's import graph against docs/architecture.md: no cycles, nothing pointing up,
nothing importing the package root; and what `import routeaudit` may not load.

The graph is read with ``ast`` from the source files (function-level imports included,
``if TYPE_CHECKING:`` blocks excluded), so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folders and the package names they are installed under (pyproject's package-dir).
SOURCES = {"routeaudit": ROOT / "routeaudit", "routeaudit.audits": ROOT / "audits",
           "routeaudit.plugins": ROOT / "plugins", "routeaudit.fixtures": ROOT / "fixtures"}
#: Example user code: it may use the public API (``import routeaudit``).
USER_CODE = ("routeaudit.fixtures", "routeaudit.plugins")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[tuple[str, int]]:
    """(imported routeaudit module, line) pairs of one module, resolved to known modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: set[tuple[str, int]] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "routeaudit":
                    found.add((_nearest(alias.name, known), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "routeaudit":
                return
            # ``from P import N`` runs P's __init__ first, whatever N is, so it depends on P
            # (``from routeaudit import metrics`` imports the package root)
            found.add((_nearest(base, known), node.lineno))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    found.add((full, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


#: The public API: user code (fixtures, plugins) may import these; nothing else may.
PUBLIC_FACADES = ("routeaudit", "routeaudit.hf", "routeaudit.testing")


def _nearest(dotted: str, known: set[str]) -> str:
    parts = dotted.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or dotted


def layer_table() -> dict[str, int]:
    """entry → layer, from the table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"^\|\s*(\d+)\s*\|(.*?)\|", line)
        if match:
            for entry in re.findall(r"`([^`]+)`", match.group(2)):
                layers[entry] = int(match.group(1))
    return layers


def entry_of(module: str) -> str:
    """The top-level entry of a module (``routeaudit.stats.gaps`` → ``stats``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_top_level_entry_has_a_layer():
    layers = layer_table()
    entries = {entry_of(m) for m in modules()} - {"__init__"}
    missing = sorted(entries - set(layers))
    assert not missing, f"docs/architecture.md has no layer for: {missing}"
    stale = sorted(set(layers) - entries)
    assert not stale, f"docs/architecture.md names entries that do not exist: {stale}"


def test_no_import_points_up_or_at_the_package_root(graph):
    layers = layer_table()
    problems = []
    for module, targets in graph.items():
        if module == "routeaudit":
            continue  # the public facade imports from every layer
        source = entry_of(module)
        for target, line in targets:
            where = f"{module}:{line} imports {target}"
            if target in PUBLIC_FACADES:
                if not module.startswith(USER_CODE):
                    problems.append(f"{where} (a public facade: {target})")
                continue
            dest = entry_of(target)
            if dest != source and layers[dest] >= layers[source]:
                problems.append(f"{where} (layer {layers[source]} → {layers[dest]})")
    assert not problems, "\n".join(problems)


def test_no_import_cycles(graph):
    edges = {m: {t for t, _ in targets if t in graph and t != m} for m, targets in graph.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The checks above can fail: a function-level import and a relative one are found."""
    pkg = tmp_path / "routeaudit"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from routeaudit import b\n")
    (pkg / "b.py").write_text("from . import a\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from routeaudit import c\n")
    (pkg / "c.py").write_text("import routeaudit.a as a\n")
    known = {"routeaudit", "routeaudit.a", "routeaudit.b", "routeaudit.c"}
    # `from routeaudit import b` runs the package root too
    assert {t for t, _ in imports_of("routeaudit.a", pkg / "a.py", known)} == {
        "routeaudit", "routeaudit.b"}
    assert {t for t, _ in imports_of("routeaudit.b", pkg / "b.py", known)} == {
        "routeaudit", "routeaudit.a"}
    assert {t for t, _ in imports_of("routeaudit.c", pkg / "c.py", known)} == {"routeaudit.a"}


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_routeaudit_loads_neither_torch_nor_scipy():
    out = _fresh("import sys, routeaudit\n"
                 "[getattr(routeaudit, n) for n in routeaudit.__all__]\n"
                 "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')"
                 " or m.startswith('scipy.'))\n"
                 "print(heavy)")
    assert out.strip() == "[]"


def test_help_and_audit_list_load_no_torch():
    out = _fresh("import sys\nfrom routeaudit.cli import main\n"
                 "assert main(['audits']) == 0\n"
                 "print('torch' in sys.modules)")
    assert out.strip().endswith("False")


def test_python_dash_m_routeaudit_help():
    done = subprocess.run([sys.executable, "-m", "routeaudit", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: routeaudit" in done.stdout and "run" in done.stdout


def test_every_methods_citation_names_a_section_that_exists():
    doc = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", doc, flags=re.M))
    cited: dict[str, list[str]] = {}
    files = [*ROOT.joinpath("routeaudit").rglob("*.py"), *ROOT.joinpath("audits").glob("*.py"),
             *ROOT.joinpath("benchmarks").glob("*.py"), ROOT / "README.md"]
    for path in files:
        for ref in re.findall(r"docs/methods\.md ?§ ?(\d+(?:\.\d+)?)", path.read_text("utf-8")):
            cited.setdefault(ref.rstrip("."), []).append(path.name)
    assert cited, "the code cites docs/methods.md"
    missing = {ref: names for ref, names in cited.items() if ref not in sections}
    assert not missing, f"citations of sections docs/methods.md does not have: {missing}"


def test_every_package_is_in_the_regular_install():
    """pyproject lists packages by hand: a sub-package missing there works in an editable
    install and is absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
