"""Imports flow one way (docs/design.md, package layout): a lower layer never imports a higher one.

Every module under ``insitu/`` is parsed with ``ast``; each import of an ``insitu`` module, at module
level or inside a function, and each ``__import__``/``importlib.import_module`` of a constant name, is
checked against the layer order below. A justified exception is listed in ``EXCEPTIONS`` with its
reason; anything else fails with the file, line and both layers. The same imports, function-level
ones included, form a graph that must have no cycle (an import deferred into a function hides a
cycle; it does not remove it). The registry's import by a computed name is the one seam
(``DYNAMIC_IMPORTS``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "insitu"

# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "io/errors",
        (
            "insitu.errors",
            "insitu.io",
            "insitu.registry",
            "insitu.privacy",
            "insitu.weights",
            "insitu.text",
            "insitu.checkpoints",
            "insitu.package_format",
            "insitu.raw_config",
        ),
    ),
    ("domains", ("insitu.domains",)),
    ("config/sharing", ("insitu.config", "insitu.sharing")),
    ("adapters/backbones", ("insitu.adapters", "insitu.backbones")),
    ("objectives/heads/exports", ("insitu.objectives", "insitu.heads", "insitu.exports")),
    ("engine", ("insitu.engine",)),
    ("pipelines", ("insitu.pipelines", "insitu.engine", "insitu.federated", "insitu.api")),
    ("cli", ("insitu.cli", "insitu.__main__", "insitu")),
]

# (importer, imported): why the import is allowed although it points upwards
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package ("insitu") is itself only: a new subpackage must be placed, not fall into the top layer
            below = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or below) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


# Modules that import other modules by a name computed at run time, and why (any other such call fails the test).
DYNAMIC_IMPORTS: dict[str, str] = {
    "insitu.registry": "the designed seam: a registry imports the module its table names for a component on first use "
    "(Registry._entry), so a low layer can name components without importing them; not an edge of the graph",
    "insitu.federated.telemetry": "imports Flower's own modules (never insitu's) by name, so that the telemetry switch is "
    "applied before Flower's first import (import_flower); not an edge of insitu's graph",
}
IMPORT_FUNCTIONS = {"__import__", "import_module"}  # builtins.__import__ and importlib.import_module


def insitu_imports(source: str, module: str, is_package: bool = False, runtime: bool = False) -> list[tuple[str | None, int]]:
    """(imported module, line) for every import of an insitu module in ``source``, anywhere in it.

    Import statements at module level, inside functions, classes and ``if`` blocks all count (relative ones
    resolved), and so do ``__import__(...)`` and ``importlib.import_module(...)`` with a constant name; a
    computed name is reported as ``(None, line)`` (see `DYNAMIC_IMPORTS`). ``from a import b`` imports
    ``a.b`` when that is a module: callers resolve names against the known modules. ``runtime``: leave out the
    imports under ``if TYPE_CHECKING:``, which never run.
    """
    here = module.split(".")
    package = here if is_package else here[:-1]
    tree = ast.parse(source)
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for s in block.body for n in ast.walk(s)}
    found: list[tuple[str | None, int]] = []
    for node in ast.walk(tree):
        if runtime and id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "insitu"]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            if target.split(".")[0] == "insitu":
                found += [(target, node.lineno)] + [(f"{target}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and _called_name(node.func) in IMPORT_FUNCTIONS and node.args:
            name = node.args[0]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                found.append((None, node.lineno))
            elif name.value.split(".")[0] == "insitu":
                found.append((name.value, node.lineno))
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and _called_name(node.test) == "TYPE_CHECKING"


def _called_name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def module_imports(path: Path, runtime: bool = False) -> list[tuple[str, int]]:
    """`insitu_imports` of a file under ``insitu/``, each name resolved to the module it imports (the longest known one)."""
    found = []
    for target, line in insitu_imports(path.read_text(), module_name(path), path.name == "__init__.py", runtime):
        if target is None:
            continue
        while target and target not in KNOWN:
            target = target.rpartition(".")[0]
        if target and (target, line) not in found:
            found.append((target, line))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
KNOWN = {module_name(p) for p in MODULES}


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in MODULES if layer_of(module_name(p)) < 0]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_layer_imports_a_higher_one() -> None:
    problems = []
    for path in MODULES:
        importer = module_name(path)
        for imported, line in module_imports(path):
            low, high = layer_of(importer), layer_of(imported)
            if high > low and not any(importer.startswith(a) and imported.startswith(b) for a, b in EXCEPTIONS):
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                problems.append(f"{where}: {importer} ({LAYERS[low][0]}) imports {imported} ({LAYERS[high][0]})")
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_every_exception_is_still_needed() -> None:
    stale = [
        f"{importer} no longer imports {imported}: remove the exception"
        for importer, imported in sorted(EXCEPTIONS)
        if not any(
            target.startswith(imported) for path in MODULES if module_name(path).startswith(importer) for target, _ in module_imports(path)
        )
    ]
    assert not stale, "\n".join(stale)


def test_layer_order_follows_the_design() -> None:
    assert layer_of("insitu.io") < layer_of("insitu.domains.dicom") < layer_of("insitu.adapters.package") < layer_of("insitu.cli")
    assert layer_of("insitu.exports.report_html") < layer_of("insitu.pipelines.report")
    assert layer_of("insitu.config") < layer_of("insitu.backbones")


def import_graph() -> dict[str, set[str]]:
    """Module -> the insitu modules importing it can run, at module level or in any function (not ``if TYPE_CHECKING:``).

    Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a`` when they are not yet imported, so the
    packages above an imported module are edges too, except the importer's own (already running when it runs).
    """
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        importer = module_name(path)
        own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
        deps: set[str] = set()
        for target, _ in module_imports(path, runtime=True):
            parts = target.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own
        graph[importer] = (deps & KNOWN) - {importer}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk, as the modules around it (``[a, b, a]``)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_the_import_graph_has_no_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (imports inside functions included): " + "; ".join(" -> ".join(c) for c in cycles)


def test_computed_imports_are_the_registry_seam_only() -> None:
    found = {module_name(p): [line for t, line in insitu_imports(p.read_text(), module_name(p)) if t is None] for p in MODULES}
    unexplained = [f"{m}:{lines}" for m, lines in sorted(found.items()) if lines and m not in DYNAMIC_IMPORTS]
    assert not unexplained, f"imports of a computed module name (import the module, or list it in DYNAMIC_IMPORTS with why): {unexplained}"
    stale = [m for m in DYNAMIC_IMPORTS if not found.get(m)]
    assert not stale, f"no longer import by a computed name, remove from DYNAMIC_IMPORTS: {stale}"


def test_the_parser_sees_imports_anywhere_and_the_cycle_finder_finds_cycles() -> None:
    source = """
import os
from insitu.io import write_json
from . import base
if True:
    import insitu.errors
def f():
    from insitu.pipelines import probe
    from ..cli import main
    return __import__("insitu"), importlib.import_module("insitu.config"), import_module(os.environ["X"])
class C:
    def g(self):
        import numpy, insitu.api
if TYPE_CHECKING:
    from insitu.adapters import AdapterSet
"""
    found = insitu_imports(source, "insitu.domains.images")
    assert set(found) - set(insitu_imports(source, "insitu.domains.images", runtime=True)) == {
        ("insitu.adapters", 15),
        ("insitu.adapters.AdapterSet", 15),
    }
    assert set(found) == {
        ("insitu.io", 3),
        ("insitu.io.write_json", 3),
        ("insitu.domains", 4),
        ("insitu.domains.base", 4),
        ("insitu.errors", 6),
        ("insitu.pipelines", 8),
        ("insitu.pipelines.probe", 8),
        ("insitu.cli", 9),
        ("insitu.cli.main", 9),
        ("insitu", 10),
        ("insitu.config", 10),
        (None, 10),
        ("insitu.api", 13),
        ("insitu.adapters", 15),
        ("insitu.adapters.AdapterSet", 15),
    }
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    graph = import_graph()  # a package's __init__ runs when one of its modules is first imported from outside it
    assert "insitu.domains" in graph["insitu.pipelines.data"] and "insitu.domains.dicom" not in graph["insitu.domains.dicom.geometry"]


# (importer, imported module, name): a private name still imported from another package, and why
PRIVATE_EXCEPTIONS: dict[tuple[str, str, str], str] = {}


def test_private_names_stay_in_their_package() -> None:
    problems = []
    for path in MODULES:
        importer = module_name(path)
        home = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "insitu" and not node.level):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            # a split-up module (insitu/domains/video/, ...) shares its privates; a layer package (insitu/domains/) does not
            shared_home = home.count(".") >= 2 and (node.module == home or node.module.startswith(home + "."))
            for name in private:
                if not shared_home and (importer, node.module, name) not in PRIVATE_EXCEPTIONS:
                    problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {importer} imports {node.module}.{name}")
    assert not problems, "private names used outside their package (make them public where they belong):\n" + "\n".join(problems)
