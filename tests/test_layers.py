"""Imports point one way: utils <- data <- models <- engine <- webapp and the top-level scripts.

Every module's imports (function-level ones included) are read with ``ast``, without importing anything.
Benchmarks and tests may import every layer and are not checked. A module also never imports another
module's private (``_name``) functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "data": 1, "models": 2, "engine": 3, "webapp": 4}
SCRIPT_LAYER = 4  # train_scst.py, predict.py, ...: the top
EXEMPT = {"benchmarks", "tests"}
# Edges the order allows but the design does not: the data layer does not load the metrics (pycocoevalcap,
# Java). The models build from a plain architecture description (models/config.py), never from the training
# schema: that is engine/config.py, which the layer order itself forbids them.
FORBIDDEN = {("data", "utils.coco_eval")}


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
    assert violations(REPO_ROOT / "data" / "x.py", "from utils.coco_eval import CaptionScorer\n") == [
        ("data", "utils.coco_eval")
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
