"""Test-wide settings: never touch the network, keep torch on one thread per worker, deterministic seeds."""

import os

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def random_tiny_tokenizer(tmp_path_factory):
    """A folder holding a TokenFlow tokenizer of the tiny preset with random weights (seed 0)."""
    from tokenizer import TokenFlowConfig, TokenFlowTokenizer

    folder = tmp_path_factory.mktemp("random-tiny-tokenizer")
    torch.manual_seed(0)
    TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny")).save_pretrained(folder)
    return folder
