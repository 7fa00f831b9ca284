"""The package's layering, from its import graph: every `import` and `from ... import` in src/thrifty (function-
local ones included, parsed with ast, never executed) between top-level packages must go down the house:

    cli, bench -> server -> gateway -> llm, config, quantizers -> engine -> models -> quant (weight formats)
    -> ops (attention, KV storage, matmul dtype) -> native (C++ kernels) -> reporting -> errors, paths

bench and cli may import anything; nothing imports them. No two packages import each other."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import thrifty

ROOT = Path(thrifty.__file__).parent
TOP = {"cli", "bench"}                      # commands and benchmarks: above everything, used by nobody
RANK = {"thrifty": 90, "server": 80, "gateway": 70, "llm": 60, "config": 60, "quantizers": 60, "engine": 50,
        "models": 40, "quant": 30, "ops": 20, "native": 10, "reporting": 5, "errors": 0, "paths": 0}
# Edges that are known to go the wrong way, each with the reason it is still here.
KNOWN: dict[tuple[str, str], str] = {}


def _unit(parts: tuple[str, ...]) -> str:
    """The top-level package or module a file belongs to (`thrifty` for the package's own __init__)."""
    return "thrifty" if parts == ("__init__.py",) else parts[0].removesuffix(".py")


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Top-level units of thrifty that one import statement reaches."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [f"{mod}.{a.name}" if mod == "thrifty" else mod for a in node.names]
    else:
        return []
    out = []
    for name in names:
        parts = name.split(".")
        if parts[0] != "thrifty":
            continue
        unit = parts[1] if len(parts) > 1 else "thrifty"
        out.append(unit if unit in RANK or unit in TOP else "thrifty")
    return out


def import_graph() -> dict[tuple[str, str], set[str]]:
    """(importer, imported) -> the files that make that edge."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        src = _unit(parts)
        module = ".".join(["thrifty", *(p.removesuffix(".py") for p in parts)]).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for dst in _targets(node, module, path.name == "__init__.py"):
                if dst != src:
                    edges[(src, dst)].add("/".join(parts))
    return edges


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Every strongly connected set of two or more units (Tarjan)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_place():
    units = {_unit(p.relative_to(ROOT).parts) for p in ROOT.rglob("*.py")}
    assert units <= set(RANK) | TOP, f"give these a layer in RANK: {sorted(units - set(RANK) - TOP)}"


def test_imports_go_down_the_layers():
    wrong = []
    for (src, dst), files in sorted(import_graph().items()):
        if (src, dst) in KNOWN:
            continue
        if dst in TOP and src not in TOP:
            wrong.append(f"{src} -> {dst} ({', '.join(sorted(files))}): nothing imports bench or cli")
        elif src not in TOP and RANK[src] <= RANK[dst]:
            wrong.append(f"{src} -> {dst} ({', '.join(sorted(files))}): {dst} is not below {src}")
    assert not wrong, "\n".join(wrong)


def test_no_cycles_between_packages():
    edges = {e for e in import_graph() if e not in KNOWN}
    assert _cycles(edges) == []


def test_the_checker_sees_local_and_relative_imports(tmp_path):
    """The graph must see an import inside a function, and a relative one, or the tests above prove nothing."""
    tree = ast.parse("def f():\n    from thrifty.bench import report\nfrom ..engine import engine\n")
    found = [u for node in ast.walk(tree) for u in _targets(node, "thrifty.gateway.ledger", False)]
    assert sorted(found) == ["bench", "engine"]
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]


def test_the_server_reads_no_engine_internals():
    """The server sees engines through their stats snapshots only, never the scheduler or block manager that
    the engine's worker thread is changing."""
    found = [f"{path.relative_to(ROOT)}: {word}" for path in (ROOT / "server").rglob("*.py")
             for word in (".scheduler", ".block_manager", ".kv_cache", "local_engine")
             if word in path.read_text()]
    assert found == []
