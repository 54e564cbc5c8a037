"""The import graph against docs/design.md: the layer table there is read here, and every import of a difflab
module (top level or inside a function) must go to a module of its own layer or of a layer above it, with no
circle among the modules (the check ../shared/tools/import_circles.py makes). A change that breaks the layering
fails here until the code or the table is changed, so the document stays true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "difflab"


def modules() -> dict[str, Path]:
    """Every module of difflab by dotted name without the 'difflab.' prefix ('runs.config'; a package's
    __init__ is the package's name; the top package itself is '__init__')."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The difflab modules ``name`` imports, anywhere in its file (a package's __init__ counts as the package)."""
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name.removeprefix("difflab.") for a in node.names if a.name.startswith("difflab.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("difflab"):
                module = node.module.removeprefix("difflab").removeprefix(".")
            else:
                continue
            # `from pkg import module` imports that module; `from module import name` the module
            names = [
                f"{module}.{a.name}".lstrip(".") if f"{module}.{a.name}".lstrip(".") in known else module
                for a in node.names
            ]
        else:
            continue
        for n in names:
            while n and n not in known:  # a name imported from a module, not a module
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def layers() -> list[tuple[int, list[str]]]:
    """docs/design.md's layer table: (layer, module patterns) per row; a pattern is `pkg/` (every module of the
    package), `pkg.module` or `module` (a top-level module)."""
    text = (ROOT / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.M)
    assert rows, "docs/design.md has no layer table (rows '| N | `pkg/`, `pkg.module` | ... |')"
    return [(int(n), re.findall(r"`([^`]+)`", cells)) for n, cells in rows]


def layer_of(module: str, table) -> int | None:
    """The layer of the most specific pattern that names ``module``."""
    best, best_len = None, -1
    for n, patterns in table:
        for p in patterns:
            if p.endswith("/"):
                hit = module == p[:-1] or module.startswith(p[:-1] + ".")
            else:
                hit = module == p
            if hit and len(p) > best_len:
                best, best_len = n, len(p)
    return best


def violations(known, table) -> list[str]:
    out = []
    for name, path in known.items():
        mine = layer_of(name, table)
        for target in imports(name, path, known):
            if layer_of(target, table) > mine:
                out.append(f"{name} (layer {mine}) imports {target} (layer {layer_of(target, table)})")
    return sorted(out)


def test_every_module_has_a_layer_and_imports_only_its_own_or_those_above():
    known, table = modules(), layers()
    unplaced = sorted(m for m in known if layer_of(m, table) is None)
    assert not unplaced, f"modules that docs/design.md's layer table does not place: {unplaced}"
    wrong = violations(known, table)
    assert not wrong, "imports against docs/design.md's layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize("moved", ["runs.config", "sampling/"])
def test_the_check_sees_a_module_put_above_what_it_imports(moved):
    """Moved to a layer 0 above every other, a module that imports difflab modules breaks the check: it can fail."""
    table = [(0, [moved])] + layers()
    assert any(w.split(" ")[0].startswith(moved.rstrip("/")) for w in violations(modules(), table))


def test_no_import_circle():
    known = modules()
    graph = {m: {t for t in imports(m, p, known) if t in known} for m, p in known.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                circles.append(sorted(scc))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"
