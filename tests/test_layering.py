"""The package's import graph: imports go down the layers, never up, and never in a circle.

cli -> api -> engine -> defenses -> subnets / evaluation -> models / data / attacks -> errors, collectives.
Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
import pathlib

import advews

ROOT = pathlib.Path(advews.__file__).parent
LAYERS = {"cli": 6, "api": 5, "engine": 4, "defenses": 3, "subnets": 2, "evaluation": 2,
          "models": 1, "data": 1, "attacks": 1}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict:
    graph = {}
    for path in ROOT.rglob("*.py"):
        name, found = module_name(path), set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m.startswith("advews.") or m == "advews"}
    known = set(graph)
    return {k: {m for m in v if m in known and m != k} for k, v in graph.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_imports_go_down_the_layers():
    up = sorted(f"{a} imports {b}" for a, targets in imports().items() for b in targets
                if layer(b) > layer(a) and b != "advews")
    assert not up, up


def test_no_import_cycles():
    graph = imports()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # package __init__ re-exports are not cycles of concepts: ignore edges into a package's own __init__
    real = [c for c in cycles if not any(
        a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert not real, real
