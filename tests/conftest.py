"""Shared fixtures: the tiny-model factory lives in tests/tiny.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(int(os.environ.get("AUTOCOMPRESS_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny BPE tokenizer (trained in-process, no download)."""
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer():
    """The tiny BPE tokenizer with a ``<bos>`` token it puts before every text (as Llama 3 and Gemma do)."""
    from tiny import tiny_tokenizer

    return tiny_tokenizer(bos=True)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (fetched once into the cache), for the few integration tests."""
    from autocompress.models import load_model

    return load_model("smollm2-135m")
