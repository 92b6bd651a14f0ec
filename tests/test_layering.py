"""The package's layers: data flows corpus -> scan -> atlas -> analyses -> report/server, and an import only goes
down this list. The test prints the import graph it checked, so a reader sees the layering at a glance."""

from __future__ import annotations

import ast
from pathlib import Path

import ffkv

SRC = Path(ffkv.__file__).parent

ORDER = [
    "errors", "version",
    "arch",
    "embedded", "models",
    "corpus",
    "embedder",
    "topk",
    "capture",
    "projection",
    "atlas",
    "scan",
    "merge",
    "analysis.words", "analysis.intervals", "analysis.keys", "analysis.values", "analysis.causal",
    "analysis.aggregation",
    "analysis.features", "analysis.patterns", "analysis.simulate", "analysis.explain", "analysis.run", "analysis",
    "report.findings", "report.data", "report.compare", "report.figures", "report.html", "report.comparison",
    "report", "report.screenshot",
    "server.index", "server.debugger", "server.explanations", "server.service", "server.app", "server",
    "server.screenshot",
    "cli",
    "",  # the package itself: its public API re-exports from below
    "__main__",
]
"""Lowest first. A module may import only modules listed before it."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """ffkv modules imported anywhere in the file (top level or inside functions), as names relative to ffkv."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ffkv" or alias.name.startswith("ffkv."):
                    found.add(alias.name[len("ffkv."):] if alias.name != "ffkv" else "")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "ffkv" or node.module.startswith("ffkv.")):
                target = node.module[len("ffkv."):] if node.module != "ffkv" else ""
            else:
                continue
            # `from . import x` / `from .pkg import mod` may name a submodule
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in ORDER else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_place_in_the_order():
    graph = import_graph()
    assert sorted(set(graph) - set(ORDER)) == [], "add new modules to ORDER"
    assert sorted(set(ORDER) - set(graph)) == [], "remove deleted modules from ORDER"


def test_imports_only_go_down():
    graph = import_graph()
    rank = {name: i for i, name in enumerate(ORDER)}
    print()
    for name in ORDER:
        deps = sorted(graph[name], key=rank.get)
        print(f"  {name or 'ffkv'} -> {', '.join(d or 'ffkv' for d in deps)}")
    upward = [f"{name or 'ffkv'} imports {dep or 'ffkv'}" for name, deps in graph.items() for dep in deps
              if rank[dep] >= rank[name]]
    assert upward == []


def test_no_import_is_guarded_by_a_broad_except():
    """An import inside `try: ... except Exception` hides a broken or circular import."""
    guarded = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            broad = any(h.type is None or (isinstance(h.type, ast.Name) and h.type.id in ("Exception", "BaseException"))
                        for h in node.handlers)
            if broad and any(isinstance(n, (ast.Import, ast.ImportFrom)) for stmt in node.body for n in ast.walk(stmt)):
                guarded.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert guarded == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a module importing one above it is reported."""
    fake = tmp_path / "ffkv"
    (fake / "analysis").mkdir(parents=True)
    (fake / "topk.py").write_text("from .scan import ScanConfig\n")
    (fake / "analysis" / "keys.py").write_text("from ..report import write_report\nfrom . import words\n")
    assert _imports(fake / "topk.py", "topk") == {"scan"}
    assert _imports(fake / "analysis" / "keys.py", "analysis.keys") == {"report", "analysis.words"}


def test_only_the_capture_module_registers_hooks():
    """One capture path: every forward that reads or edits the FFNs goes through ffkv.capture."""
    hooking = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                     if "register_forward" in p.read_text() and p.name != "capture.py")
    assert hooking == []
