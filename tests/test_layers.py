"""The packages form layers (prep <- shards <- train; the two entry points, prep/cli.py and
train/main.py, on top) and no module imports itself back, directly or through others.
Every import counts: top-level, inside functions, under TYPE_CHECKING."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"prep": 0, "shards": 1, "train": 2}
ENTRY_POINTS = {"prep.cli", "train.main"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYER:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return cycles


def test_no_import_cycle_between_modules():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_packages_form_layers():
    wrong = [f"{m} -> {d}" for m, deps in import_graph().items() if m not in ENTRY_POINTS
             for d in deps if LAYER[d.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert wrong == []
