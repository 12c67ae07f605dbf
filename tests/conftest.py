import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


class _Hidden:
    """A meta-path finder that makes the import of some modules fail, as on a machine without them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by pytest --without)", name=fullname)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--without", action="append", default=[], metavar="MODULE",
                     help="run as if MODULE were not installed, to check that the tests needing it skip")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    hidden = [name for value in config.getoption("--without") for name in value.split(",") if name]
    if hidden:
        sys.meta_path.insert(0, _Hidden(hidden))
    config.addinivalue_line(
        "markers",
        "optional_tool(problem, ci_requires=False): the test needs a tool that may be missing; ``problem`` says "
        "what is missing (None when it is there). It is skipped with that reason, or fails where CI is set "
        "and ``ci_requires`` is true.",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """One policy for tests that need an optional tool (a browser, CUDA): skip with the reason on a
    newcomer's machine, fail in CI where .ci/run installs the tool."""
    for mark in item.iter_markers("optional_tool"):
        problem = mark.args[0]
        if problem is None:
            continue
        if mark.kwargs.get("ci_requires") and os.environ.get("CI"):
            pytest.fail(f"{problem} (CI is set, and .ci/run installs it)", pytrace=False)
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Handlers that a test's run installed on the root logger (its console stream, its train.log) are
    removed and closed after it, so that no later test logs into them; pytest's own capture handlers stay."""
    import logging

    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and lose a lot when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face Hub lookups: loading resolves local files and the bundled tokenizer only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from models.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small generated shapes data set (shared by the training tests)."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, num_train=48, num_val=8, num_test=8, image_size=128, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One untrained tiny captioner saved as training saves it (demo encoder, 2-layer GPT-2, captions of at
    most 8 tokens, the other settings at their defaults), for the tests whose weights need not be trained."""
    import torch
    from helpers import save_model

    from engine.config import Config
    from models.build import build_captioner

    torch.manual_seed(0)
    cfg = Config()
    cfg.encoder.vision_config = "swin_demo"
    cfg.model.gpt2_config = {"n_layer": 2, "n_embd": 64, "n_head": 2}
    cfg.decode.max_len = 8
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model(path, build_captioner(cfg), cfg)
    return path
