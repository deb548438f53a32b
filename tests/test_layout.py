"""The shape of the code: no import circles inside a package, and every subpackage shipped.

A circle (a imports b, b imports a, even from inside a function) means neither module can be
understood, tested or replaced alone; the fix is to move what both need into a third module.
Edges come from every `import` / `from ... import` in a module's source, at any depth (imports
hidden in functions count); a package's implicit import of its parents does not.
"""
import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"client": "sparseps", "server": "sparseps.server"}   # folder -> package name


def modules(folder: str, package: str) -> dict:
    """{dotted module name: path} of every .py file under folder (subpackages included)."""
    base = ROOT / folder
    out = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package] + parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path, known: dict) -> set:
    """The modules of `known` that module `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else pkg itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        # a module outside the folder (sparseps.proto from client/) is no edge
        found.update(t for t in targets if t in known and t != name)
    return found


def cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe(component: list, graph: dict) -> str:
    """One circle of a component, spelled out: a -> b -> ... -> a."""
    members = set(component)
    path, seen = [component[0]], {component[0]: 0}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)[0]
        if nxt in seen:
            loop = path[seen[nxt]:] + [nxt]
            return " -> ".join(loop)
        seen[nxt] = len(path)
        path.append(nxt)


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_import_cycles(folder):
    known = modules(folder, PACKAGES[folder])
    graph = {name: {m for m in imports_of(name, path, known) if m in known} for name, path in known.items()}
    found = cycles(graph)
    assert not found, f"import circles in {folder}/:\n" + "\n".join(
        f"  {describe(c, graph)}   (component: {', '.join(c)})" for c in found)


def test_every_client_subpackage_is_shipped():
    """A folder with __init__.py under client/ or server/ is a package setuptools must list."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    wanted = {name for folder, package in PACKAGES.items() for name, path in modules(folder, package).items()
              if path.name == "__init__.py"}
    assert not wanted - listed, f"pyproject.toml [tool.setuptools] packages lacks {sorted(wanted - listed)}"
