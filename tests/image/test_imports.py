"""No import cycles in the product's packages, function-level imports included.

A cycle hidden inside a function still ties two modules together: neither can be read, tested or moved alone.
The graph is built from the source with ``ast`` (no module is imported), over ``maskrcnn``, ``local`` and
``pipeline``; an import of a package counts as an import of its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import REPO

ROOTS = {"maskrcnn": REPO / "images/maskrcnn/src/maskrcnn", "local": REPO / "local", "pipeline": REPO / "pipeline"}

pytestmark = pytest.mark.unit


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The product modules ``name`` imports anywhere in its source (functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_cycle_through_a_function_level_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    found = modules()
    graph = {name: imports(name, path, set(found)) - {name} for name, path in found.items()}
    # A package's __init__ importing its own submodules is how packages re-export; not a cycle between concepts.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (found[name].name == "__init__.py" and t.startswith(name + "."))}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_server_and_the_saved_model_format_import_nothing_of_training() -> None:
    """The two processes meet only in contract, errors, device and model/: serve never loads training code."""
    found = modules()
    graph = {name: imports(name, path, set(found)) - {name} for name, path in found.items()}
    for start in [name for name in found if name.startswith("maskrcnn.serve.")] + ["maskrcnn.model.format"]:
        training = sorted(m for m in reachable(graph, start) if m.startswith("maskrcnn.train"))
        assert not training, f"{start} reaches {training}"


# Which package may import which: the harness runs the pipeline and the image; the pipeline builds on the image's
# facts (hyperparameters, metric definitions, the /opt/ml contract); the image stands alone.
MAY_IMPORT = {
    "maskrcnn": {"maskrcnn"},
    "pipeline": {"maskrcnn", "pipeline"},
    "local": {"maskrcnn", "pipeline", "local"},
}


def test_packages_depend_one_way() -> None:
    """Function-level imports included: pipeline/ never reaches into local/, the image into neither."""
    found = modules()
    wrong = sorted(
        f"{name} -> {target}"
        for name, path in found.items()
        for target in imports(name, path, set(found))
        if target.split(".")[0] not in MAY_IMPORT[name.split(".")[0]]
    )
    assert not wrong, "imports against the packages' direction: " + ", ".join(wrong)


def test_only_local_sfn_patches_moto() -> None:
    """moto's internals (its backends, responses, the interpreter) are reached from one module; the rest of the
    harness starts moto (``mock_aws``, its server) and hands callbacks to local.sfn."""
    reaching = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            inner = [t for t in targets if t.startswith("moto.") and t != "moto.server"]
            if inner and name != "local.sfn":
                reaching.append(f"{name}: {', '.join(inner)}")
    assert not reaching, "moto's internals patched outside local.sfn: " + "; ".join(reaching)
