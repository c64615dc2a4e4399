"""Every module of the package imports only its own or lower layers, and no import chain comes back around.

Read from the source (AST), so imports inside functions and under ``TYPE_CHECKING``
count too: a lazy import is still a dependency. docs/ARCHITECTURE.md draws the
same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlastore"

LAYERS: list[tuple[str, ...]] = [
    # pure: layout, format, codecs, plain numpy; no storage, no zarr
    (
        "vlastore.version",
        "vlastore.errors",
        "vlastore.format",
        "vlastore.catalog",
        "vlastore.layout",
        "vlastore.shardcodec",
        "vlastore.integrity",
        "vlastore.windows",
        "vlastore.dtypes",
        "vlastore.ranks",
        "vlastore.snapshot",
    ),
    ("vlastore.storage",),  # the seam: bytes, ranges, maps, conditional writes
    ("vlastore.nodes",),  # zarr groups, attributes and small arrays over the seam
    ("vlastore.family", "vlastore.commitlog"),  # one generation of one family; the commit log of format 2
    ("vlastore.living",),  # format 2: the arrays a commit names, written and read checked
    ("vlastore.read", "vlastore.writer"),
    ("vlastore.stats", "vlastore.storedstats", "vlastore.sampler", "vlastore.transport", "vlastore.loader"),
    ("vlastore.store",),  # the manifest; makes handles, readers and writers
    ("vlastore.reader", "vlastore.report", "vlastore.dataset"),
    ("vlastore.demo",),
    ("vlastore.inspect", "vlastore.ingest"),
    ("vlastore.features",),
    ("vlastore.cli", "vlastore.__main__", "vlastore"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement in ``module`` loads (parents of a submodule included)."""
    targets: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    for name in names:
        if not (name == "vlastore" or name.startswith("vlastore.")):
            continue
        while name not in MODULES:
            name = name.rpartition(".")[0]
        parts = name.split(".")
        # importing a submodule runs its packages' __init__ first (the root package's aside: always loaded;
        # and the packages holding the importing module itself: already being loaded)
        targets += [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return [t for t in targets if t != module and not module.startswith(t + ".")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {
            t
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for t in _resolve(module, node)
        }
    return graph


def _layer(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)"
    return max(matches)[1]  # the longest prefix decides


def test_every_module_imports_only_its_own_or_lower_layers() -> None:
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in sorted(_graph().items())
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_check_sees_lazy_and_type_checking_imports() -> None:
    graph = _graph()
    assert "vlastore.read" in graph["vlastore.stats"]  # under TYPE_CHECKING
    assert "vlastore.features.qwen" in graph["vlastore.features.registry"]  # inside a function
    assert (
        "vlastore.storage" in graph["vlastore.storage.local"]
        or "vlastore.storage.base" in graph["vlastore.storage.local"]
    )
