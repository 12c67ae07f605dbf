"""A Hugging Face Space for an exported model (``export.py --space``): the folder holds the Space's
``app.py``, ``requirements.txt``, a README with the Space's YAML header, the model (``model/``) or its Hub id,
and a copy of the project's inference packages, since a Space runs its folder alone."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from utils.io import write_text

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("utils", "data", "models", "webapp")  # what load_captioner and the page import; no training code
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
            f"`{'`, `'.join(PACKAGES)}` are copies of the project's inference code.\n")  # fmt: skip


def requirements() -> str:
    """The project's core requirements plus Gradio (what the Space installs)."""
    core = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    app = (ROOT / "requirements-app.txt").read_text(encoding="utf-8")
    gradio = [line for line in app.splitlines() if line.startswith("gradio>")]
    return core.rstrip("\n") + "\n" + "\n".join(gradio) + "\n"


def write_space(out: Path, title: str, license: str, hub_model: str | None, examples: Path | None) -> None:
    """Everything but the model in ``out``: app.py, requirements.txt, README.md, the code, examples."""
    for package in PACKAGES:
        target = out / package
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if examples is not None:
        photos = sorted(p for p in examples.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not photos:
            raise ValueError(f"--space_examples {examples}: no .jpg, .jpeg or .png file in it")
        (out / EXAMPLES_DIR).mkdir(exist_ok=True)
        for photo in photos:
            shutil.copy2(photo, out / EXAMPLES_DIR / photo.name)
    model = hub_model or MODEL_DIR
    write_text(out / "app.py", APP.format(model=model, examples=EXAMPLES_DIR))
    write_text(out / "requirements.txt", requirements())
    write_text(out / "README.md", space_readme(title, license, model, hub_model is not None))
