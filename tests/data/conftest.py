"""Data tests run offline: `datasets` and the hub client must never reach the network."""

import os

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from megatron_archer.data import build_tiny_tokenizer

    return build_tiny_tokenizer()
