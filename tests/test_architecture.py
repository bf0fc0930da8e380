"""The house as docs/architecture.md draws it: floors that import only downward, no circle, small functions, the
schema alone in config.py, one loop that reads top to bottom, and one owner of step arithmetic."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raytrain"
# Each module's floor; a module imports only from floors below its own or its own (without a circle).
FLOORS = {
    0: {"section", "errors", "lengths", "config", "steps", "console"},
    1: {"tokenizer", "sources", "data", "devices", "model", "attention", "loss", "engine", "ops", "meter", "compiled",
        "evaluate", "trackers", "runlog", "checkpoint"},
    2: {"checks", "prepare", "generate", "plan", "summary"},
    3: {"loading"},
    4: {"export", "train", "report", "tune_spec"},
    5: {"launch"},
    6: {"population", "doctor"},
    7: {"tune"},
    8: {"cli"},
}
FLOOR = {module: floor for floor, modules in FLOORS.items() for module in modules}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def imports(tree: ast.Module) -> list[tuple[str, ast.ImportFrom]]:
    """(raytrain module, the import statement) for every import of the package, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raytrain."):
            found.append((node.module.split(".")[1], node))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], node) for a in node.names if a.name.startswith("raytrain.")]
    return found


def test_every_module_has_a_floor():
    assert set(modules()) == set(FLOOR)


def test_imports_go_down_and_never_round():
    graph = {name: {target for target, _ in imports(tree)} for name, tree in modules().items()}
    for name, targets in graph.items():
        for target in targets:
            assert FLOOR[target] <= FLOOR[name], f"{name} (floor {FLOOR[name]}) imports {target} " \
                                                 f"(floor {FLOOR[target]})"
    seen, done = set(), set()

    def visit(node, path):
        assert node not in seen or node in done, f"import circle: {' -> '.join(path + [node])}"
        if node in done:
            return
        seen.add(node)
        for target in graph[node]:
            visit(target, path + [node])
        done.add(node)
    for name in graph:
        visit(name, [])


def test_the_schema_imports_nothing_but_the_ground_floor():
    assert {target for target, _ in imports(modules()["config"])} == {"lengths", "section"}


def test_a_package_import_inside_a_function_says_why_it_waits():
    """Only the CLI's handlers import what they run when they run (its docstring says why); anywhere else a
    function-local import of the package carries a comment on its line."""
    for name, tree in modules().items():
        lines = (PACKAGE / f"{name}.py").read_text().splitlines()
        for _, node in imports(tree):
            if node.col_offset and name != "cli":
                assert "#" in lines[node.lineno - 1], f"{name}.py:{node.lineno} imports inside a function silently"


@pytest.mark.parametrize("name", sorted(FLOOR))
def test_no_function_is_longer_than_60_lines(name):
    for node in ast.walk(modules()[name]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.end_lineno - node.lineno + 1
            docstring = ast.get_docstring(node)
            length = body - (len(docstring.splitlines()) + 1 if docstring else 0)
            assert length <= 60, f"{name}.{node.name} is {length} lines"


def test_the_loop_reads_in_about_thirty_lines():
    worker = next(n for n in ast.walk(modules()["train"]) if isinstance(n, ast.FunctionDef)
                  and n.name == "train_worker")
    assert worker.end_lineno - worker.lineno + 1 <= 36


def test_step_arithmetic_has_one_owner():
    """Nothing but steps.py divides a token budget (tokens_per_step, micro_batch_tokens) into rows."""
    budgets = {"tokens_per_step", "micro_batch_tokens"}
    for name, tree in modules().items():
        divides = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.BinOp)
                   and isinstance(node.op, ast.FloorDiv) and isinstance(node.left, (ast.Attribute, ast.Name))
                   and getattr(node.left, "attr", getattr(node.left, "id", None)) in budgets]
        assert not divides or name == "steps", f"{name}.py divides a token budget at lines {divides}"
