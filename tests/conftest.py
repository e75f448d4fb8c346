"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random checkpoints.

Everything here is built from the small text files in tests/fixtures, so the
suite needs neither the network nor ../shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.decoder import Transformer
from model.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


def fixture_texts() -> list[str]:
    text = (FIXTURES / "shakespeare_sample.txt").read_text() + (FIXTURES / "dictionary_sample.txt").read_text()
    return text.splitlines(keepends=True)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(fixture_texts()), vocab_size=512)


def make_tiny_model(tokenizer: Tokenizer, seed: int = 0, **overrides) -> Transformer:
    config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, **overrides)
    return Transformer(config).init_weights(seed).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny checkpoint with random weights (GQA, tied embeddings)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, make_tiny_model(tokenizer), tokenizer)
    return path


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model with a 2048-token context: tool instructions alone are ~800 tokens of this tokenizer."""
    path = tmp_path_factory.mktemp("ckpt-long") / "tiny-long"
    save_checkpoint(path, make_tiny_model(tokenizer, max_seq_len=2048), tokenizer)
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A module's running `hearth serve` app on the tiny model (tests/server_fixtures.py); modules that need
    other settings define their own `server`."""
    from tests.server_fixtures import running_server

    with running_server(tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    """An httpx client for the module's `server`."""
    from tests.server_fixtures import http_client

    with http_client(server.url) as client:
        yield client
