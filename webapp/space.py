"""A Hugging Face Space for an exported model (``export.py --space``): the folder holds the Space's
``app.py``, ``requirements.txt``, a README with the Space's YAML header, the model (``model/``) or its Hub id,
and a copy of the project's modules that the page imports, since a Space runs its folder alone.

What the Space carries is read off the code: the project's modules reachable by imports from the Space's
``app.py`` (imports inside functions included), and the requirement lines of the libraries those modules
import, so no training module and no training-only library (pycocoevalcap, pycocotools) goes along."""

from __future__ import annotations

import ast
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from utils.io import write_text

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("utils", "data", "metrics", "models", "engine", "webapp")
APP_IMPORTS = ("models", "models.api", "webapp.service", "webapp.ui")  # what the Space's app.py imports
REQUIREMENT_FILES = ("requirements.txt", "requirements-app.txt", "requirements-dev.txt")
MODEL_DIR = "model"
EXAMPLES_DIR = "examples"

APP = '''"""The captioning page of this Space (written by the OPG project's export.py --space).

Spaces run ``python app.py`` with GRADIO_SERVER_NAME=0.0.0.0; elsewhere set GRADIO_SERVER_NAME=127.0.0.1 to keep
it on this machine, and GRADIO_SERVER_PORT to move it off 7860.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the project's inference packages, copied beside this file

from models import load_captioner  # noqa: E402
from webapp.service import CaptionService  # noqa: E402
from webapp.ui import serve  # noqa: E402

MODEL = {model!r}  # a folder beside this file, or a Hub id

if __name__ == "__main__":
    local = HERE / MODEL
    if local.is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is here: no Hub request
    captioner = load_captioner(local if local.is_dir() else MODEL, device=os.environ.get("OPG_DEVICE", "auto"))
    examples = HERE / {examples!r}
    serve(
        CaptionService(captioner, MODEL),
        host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        examples_dir=examples if examples.is_dir() else None,
    )
'''


def gradio_version() -> str:
    """The installed Gradio's version: the Space's ``sdk_version``, so that it runs what was tested here."""
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise ValueError("--space needs Gradio installed (pip install -r requirements-app.txt)") from None


def space_readme(title: str, license: str, model: str, hub_model: bool) -> str:
    """The Space's README: its YAML header (``sdk: gradio``, ``app_file``) and what the folder holds."""
    models = f"models:\n- {model}\n" if hub_model else ""
    where = f"the Hub model `{model}`" if hub_model else f"the model in `{MODEL_DIR}/` (its model card is there)"
    return (f"---\ntitle: {title}\nsdk: gradio\nsdk_version: {gradio_version()}\napp_file: app.py\n"
            f"license: {license}\npinned: false\n{models}---\n\n# {title}\n\n"
            f"Image captioning (OPG: X-VLM encoder, mapping network, GPT-2) with {where}. Upload photos, choose "
            "greedy decoding, beam search or sampling, and read the captions with their scores; the Sparse mask "
            "tab shows which prefix positions GPT-2 reads.\n\n"
            "Run it locally: `pip install -r requirements.txt`, then `GRADIO_SERVER_NAME=127.0.0.1 python app.py`. "
            "From a script: `gradio_client.Client(url).predict([handle_file(path)], \"beam\", 3, 1, 1.0, 1.0, None, "
            "api_name=\"/caption\")`.\n\n"
            "The Python packages beside app.py are copies of the project's inference code.\n")  # fmt: skip


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(module: str, path: Path) -> list[str]:
    """Every module name ``path`` imports, as absolute dotted names (``from a import b`` gives a and a.b)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            names += [source] + [f"{source}.{alias.name}" for alias in node.names]
    return names


def inference_code() -> tuple[list[Path], set[str]]:
    """The project's module files the Space's app.py reaches, and the top-level third-party modules they
    import."""
    todo, seen, libraries = list(APP_IMPORTS), {}, set()
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__.py
        for imported in _imported_names(name, path):
            top = imported.split(".")[0]
            if top in PROJECT_PACKAGES:
                todo.append(imported)
            elif top not in sys.stdlib_module_names and top != "__future__":
                libraries.add(top)
    return sorted(seen.values()), libraries


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(libraries: set[str]) -> str:
    """The requirement lines (from the project's requirement files, comments dropped) of the distributions
    that provide ``libraries``."""
    lines = {}
    for file in REQUIREMENT_FILES:
        for line in (ROOT / file).read_text(encoding="utf-8").splitlines():
            spec = line.split("#")[0].strip()
            if spec and not spec.startswith("-"):
                lines.setdefault(_canonical(re.split(r"[<>=!~\[; ]", spec)[0]), spec)
    provided = metadata.packages_distributions()
    needed, missing = [], []
    for library in sorted(libraries):
        found = [lines[_canonical(d)] for d in provided.get(library, [library]) if _canonical(d) in lines]
        (needed if found else missing).extend(found or [library])
    if missing:
        raise ValueError(f"the Space's code imports {', '.join(missing)}, which no requirement file lists")
    header = "# What the captioning page imports (written by export.py --space).\n"
    return header + "\n".join(sorted(set(needed))) + "\n"


def write_space(out: Path, title: str, license: str, hub_model: str | None, examples: Path | None) -> None:
    """Everything but the model in ``out``: app.py, requirements.txt, README.md, the code, examples."""
    files, libraries = inference_code()
    for package in PROJECT_PACKAGES:
        if (out / package).exists():
            shutil.rmtree(out / package)
    for file in files:
        target = out / file.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    if examples is not None:
        photos = sorted(p for p in examples.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not photos:
            raise ValueError(f"--space_examples {examples}: no .jpg, .jpeg or .png file in it")
        (out / EXAMPLES_DIR).mkdir(exist_ok=True)
        for photo in photos:
            shutil.copy2(photo, out / EXAMPLES_DIR / photo.name)
    model = hub_model or MODEL_DIR
    write_text(out / "app.py", APP.format(model=model, examples=EXAMPLES_DIR))
    write_text(out / "requirements.txt", requirements(libraries))
    write_text(out / "README.md", space_readme(title, license, model, hub_model is not None))
