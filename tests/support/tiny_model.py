"""The tests' tiny random Llama (48k parameters) with a real byte-level BPE tokenizer, built offline in seconds.

It has Llama 3's special tokens, several EOS ids (as Llama 3.2 has) and a Llama 3 chat template, so templating,
special-token handling and the executor can be tested exactly as with the real model, without a download. Built by
the same `benchmarks.random_llama` as the benchmarks' random-weight Llama 3.2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from benchmarks.random_llama import BOS, PAD, VOCAB_SIZES, build_tokenizer, liven, save_random_llama

# Ids 0-7, in this order: the tests were written against this layout (the benchmarks put Llama 3's 256 at the end).
SPECIAL_TOKENS = [
    BOS,
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    PAD,
]

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello there! How can I help you today? I am a helpful assistant.",
    "Discord bots answer questions in channels, threads and direct messages.",
    "Llamas are domesticated South American camelids. Émoji 🦙 and ünïcödé are fine.",
    "def add(a, b):\n    return a + b\n```python\nprint('hi')\n```",
    "system user assistant: Alice said hi; Bob asked what 2 + 2 is. It is 4.",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(CORPUS * 4, VOCAB_SIZES["test"], SPECIAL_TOKENS, specials_first=True, model_max_length=2048)


def save_tiny_llama(directory: Path) -> Path:
    """Write the tiny model and tokenizer as a normal Hugging Face model directory."""
    return save_random_llama("test", directory, CORPUS * 4, special_tokens=SPECIAL_TOKENS, specials_first=True)


def load_lively_llama(tiny_model_dir: Path) -> PreTrainedModel:
    """The tiny Llama with its weights redrawn (`liven`): at the initial scale greedy decoding repeats a newline
    forever, so every reply would be blank and an output routed to the wrong request would go unnoticed."""
    return liven(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
