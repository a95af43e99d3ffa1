"""The package's import graph: no cycle among sppx modules, no private name imported across modules,
and pruners free of tuning code. Read from the source (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sppx"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], bool]]:
    """``(module, names, typing_only)`` for every sppx import in the file. ``from a.b import c`` names
    module ``a.b.c`` when that is a module; typing_only marks imports under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_lines = {
        n.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for body in node.body
        for n in ast.walk(body)
        if hasattr(n, "lineno")
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sppx"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                target = sub if sub in known else node.module
                found.append((target, [alias.name], node.lineno in typing_lines))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sppx"):
                    found.append((alias.name, [], node.lineno in typing_lines))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the sppx modules it imports at run time (a package's ``__init__`` counts as itself)."""
    known = set(modules())
    edges: dict[str, set[str]] = {}
    for name, path in modules().items():
        targets = {t for t, _, typing_only in imports(path, known) if not typing_only and t != name}
        edges[name] = {t for t in targets if t in known}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def is_package_edge(a: str, b: str) -> bool:
    """A package importing its own submodule (``sppx.adapters`` -> ``sppx.adapters.spp``) or the
    reverse is how packages re-export names, not a dependency between concepts."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycle_among_sppx_modules():
    edges = graph()
    concept_edges = {a: {b for b in bs if not is_package_edge(a, b)} for a, bs in edges.items()}
    assert cycles(concept_edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    known = set(modules())
    private = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        for target, names, _ in imports(path, known)
        for imported in names
        if imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert private == []


def test_pruners_do_not_import_tuning_code():
    tuning = ("sppx.adapters", "sppx.teachers", "sppx.module", "sppx.pipeline")
    known = set(modules())
    offending = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if name.startswith("sppx.pruning")
        for target, _, typing_only in imports(path, known)
        if not typing_only and target.startswith(tuning)
    ]
    assert offending == []


def test_every_pipeline_stage_has_the_stage_hooks():
    from sppx.contracts import Stage
    from sppx.pipeline import STAGES

    assert [s.name for s in STAGES][:3] == ["load", "measure dense", "prune"]
    assert all(isinstance(s, Stage) for s in STAGES)
