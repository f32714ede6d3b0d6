"""Imports flow one way (docs: DESIGN.md, package layout): a lower layer never imports a higher one.

Every module under ``insitu/`` is parsed with ``ast``; each import of an ``insitu`` module, at module
level or inside a function, is checked against the layer order below. A justified exception is
listed in ``EXCEPTIONS`` with its reason; anything else fails with the file, line and both layers.
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
    ("pipelines", ("insitu.pipelines", "insitu.federated", "insitu.api")),
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
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def insitu_imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of an insitu module in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "insitu"]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            if target.split(".")[0] == "insitu":
                found.append((target, node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in MODULES if layer_of(module_name(p)) < 0]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_layer_imports_a_higher_one() -> None:
    problems = []
    for path in MODULES:
        importer = module_name(path)
        for imported, line in insitu_imports(path):
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
            target.startswith(imported) for path in MODULES if module_name(path).startswith(importer) for target, _ in insitu_imports(path)
        )
    ]
    assert not stale, "\n".join(stale)


def test_layer_order_follows_the_design() -> None:
    assert layer_of("insitu.io") < layer_of("insitu.domains.dicom") < layer_of("insitu.adapters.package") < layer_of("insitu.cli")
    assert layer_of("insitu.exports.report_html") < layer_of("insitu.pipelines.report")
    assert layer_of("insitu.config") < layer_of("insitu.backbones")


def module_level_imports(path: Path, known: set[str]) -> set[str]:
    """The insitu modules ``path`` imports when it is first imported (top-level statements only)."""
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "insitu" and not node.level:
            deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.split(".")[0] == "insitu"}
    return deps & known


def test_module_level_imports_have_no_cycle() -> None:
    modules = {module_name(p): p for p in MODULES}
    graph = {m: module_level_imports(p, set(modules)) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


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
