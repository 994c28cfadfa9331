"""Fixtures of the local engine's tests: the tiny Llama with lively weights, its tokenizer, and prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tests.support.local_engine import TEXTS
from tests.support.tiny_model import load_lively_llama


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return load_lively_llama(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [tokenizer.encode(text) for text in TEXTS]
