import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


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
