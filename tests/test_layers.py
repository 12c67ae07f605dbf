"""Imports point one way: utils <- metrics <- data <- models <- engine <- webapp and the top-level scripts,
and no module imports itself back through others (no import cycle).

Every module's imports (function-level ones included) are read with ``ast``, without importing anything.
Benchmarks and tests may import every layer and are not checked. A module also never imports another
module's private (``_name``) functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "metrics": 1, "data": 2, "models": 3, "engine": 4, "webapp": 5}
SCRIPT_LAYER = 5  # train_scst.py, predict.py, ...: the top
EXEMPT = {"benchmarks", "tests"}
# Edges the order allows but the design does not: the data layer does not load the COCO scorers (pycocoevalcap,
# Java); it writes CIDEr-D document frequencies only. The models build from a plain architecture description
# (models/config.py), never from the training schema: that is engine/config.py, which the layer order itself
# forbids them.
FORBIDDEN = {("data", "metrics.coco_eval"), ("data", "metrics.java")}


def package_of(path: Path) -> str:
    """``utils`` for utils/io.py, ``<script>`` for a top-level module."""
    relative = path.relative_to(REPO_ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else "<script>"


def layer_of(package: str) -> int | None:
    """The layer of a first-party package, the script layer for ``<script>``, None for other packages."""
    return SCRIPT_LAYER if package == "<script>" else LAYERS.get(package)


def imported_modules(source: str) -> list[str]:
    """Absolute module names a module imports (``from models import api`` gives ``models.api``)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def is_private(name: str) -> bool:
    """Whether ``name`` is another first-party module's private function (``models.tokenizer._hub``)."""
    parts = name.split(".")
    return parts[0] in LAYERS and parts[-1].startswith("_") and not parts[-1].startswith("__")


def violations(path: Path, source: str) -> list[tuple[str, str]]:
    """``(importer package, imported module)`` of each import of a higher layer or a forbidden module."""
    package = package_of(path)
    own = layer_of(package)
    found = []
    for name in imported_modules(source):
        target = name.split(".")[0]
        target_layer = LAYERS.get(target)
        if (target_layer is not None and own is not None and target_layer > own) or is_private(name):
            found.append((package, name))
        found += [(package, module) for pkg, module in FORBIDDEN if pkg == package and _within(name, module)]
    return found


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def project_modules() -> list[Path]:
    files = sorted(REPO_ROOT.glob("*.py")) + sorted(REPO_ROOT.glob("*/**/*.py"))
    return [f for f in files if package_of(f) not in EXEMPT and not package_of(f).startswith(".")]


def test_the_checker_sees_every_kind_of_import() -> None:
    source = "import engine.runner\nfrom models import api\ndef f():\n    from utils.config import Config\n"
    in_data = violations(REPO_ROOT / "data" / "x.py", source)
    in_models = violations(REPO_ROOT / "models" / "x.py", source)
    assert in_data == [("data", "engine.runner"), ("data", "models.api")]
    assert in_models == [("models", "engine.runner")]
    assert violations(REPO_ROOT / "data" / "x.py", "from metrics.coco_eval import CaptionScorer\n") == [
        ("data", "metrics.coco_eval")
    ]
    assert violations(REPO_ROOT / "predict.py", source) == []
    private = "from models.tokenizer import _hub_reachable\nfrom PIL import _version\n"
    assert violations(REPO_ROOT / "models" / "x.py", private) == [("models", "models.tokenizer._hub_reachable")]


def test_lower_layers_never_import_higher_ones() -> None:
    modules = project_modules()
    assert {package_of(m) for m in modules} >= {*LAYERS, "<script>"}
    found: dict[tuple[str, str], list[str]] = {}
    for module in modules:
        for edge in violations(module, module.read_text(encoding="utf-8")):
            found.setdefault(edge, []).append(str(module.relative_to(REPO_ROOT)))
    assert not found, "imports against the layer order: " + "; ".join(
        f"{', '.join(files)} imports {module}" for (_, module), files in sorted(found.items())
    )


def module_name(path: Path) -> str:
    """``models.decoding`` for models/decoding.py, ``models`` for models/__init__.py, ``predict`` for predict.py."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from models import api`` counts as ``models.api`` when that
    is a module, else as ``models``)."""
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        targets = set()
        for imported in imported_modules(source):
            while imported and imported not in sources:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per strongly connected group of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import() -> None:
    sources = {
        "models.a": "from models.b import f\n",
        "models.b": "def f():\n    from models.c import g\n",
        "models.c": "import models.a\n",
        "models.d": "from models import a\n",
    }
    assert cycles(import_graph(sources)) == [["models.a", "models.b", "models.c"]]


def test_no_import_cycles() -> None:
    sources = {module_name(m): m.read_text(encoding="utf-8") for m in project_modules()}
    assert not cycles(import_graph(sources)), "import cycles: " + "; ".join(
        " <-> ".join(group) for group in cycles(import_graph(sources))
    )
