"""Llama models with random weights and an offline tokenizer, saved as normal model directories: the one builder
behind the tests' tiny model and the benchmarks' random-weight Llama 3.2.

Speed does not depend on the weights, so the benchmark can measure the Llama-3.2-1B architecture on a machine
that reaches no model hub, and the tests get a model in seconds. The directory goes through the same loader as a
real one (`MODEL=<directory>`).

The tokenizer has Llama 3's layout: ordinary tokens, then the special tokens at the end of the vocabulary with
Llama 3's names (`<|begin_of_text|>`, `<|eot_id|>`, ...; all 256 of them at ids 128000-128255 for the real size),
the Llama 3 chat template and the same three EOS ids. Its byte-level BPE merges are trained in a second on the
caller's texts, so prompts come out at about one token per word, as with the real tokenizer; the remaining
ordinary ids are filler entries that encoding never produces but that decode to plain ASCII text, so random
generated ids detokenize like real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

RandomConfigName = Literal["llama-3.2-1b", "tiny", "test"]

NUM_SPECIAL_TOKENS = 256
BOS = "<|begin_of_text|>"
EOS_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
PAD = "<|finetune_right_pad_id|>"

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama3_special_tokens() -> list[str]:
    """Llama 3's 256 special tokens in id order (128000 + index)."""
    named = {
        0: BOS,
        1: "<|end_of_text|>",
        4: PAD,
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    tokens, reserved = [], 0
    for index in range(NUM_SPECIAL_TOKENS):
        if index in named:
            tokens.append(named[index])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


# The vocabulary of each configuration: the real one, and small ones whose ordinary ids still hold the 256 bytes.
VOCAB_SIZES: dict[RandomConfigName, int] = {"llama-3.2-1b": 128_256, "tiny": 1_024, "test": 400}


def model_config(name: RandomConfigName, vocab_size: int) -> LlamaConfig:
    """The real Llama-3.2-1B configuration; a tiny one of the same shape for checks on a CPU; or the tests' model,
    smaller still (48k parameters, a 2,048-token context, default rope)."""
    if name == "test":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    sizes = {
        "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    }[name]
    return LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=8 if name == "llama-3.2-1b" else 2,
        head_dim=64 if name == "llama-3.2-1b" else 16,
        max_position_embeddings=131_072,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=True,
        **sizes,
    )


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] | None = None,
    *,
    specials_first: bool = False,
    model_max_length: int = 131_072,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids, `special_tokens` (default: Llama 3's 256, which must
    include BOS, the three EOS tokens and PAD) being the last ids, or the first with `specials_first`."""
    special_tokens = list(special_tokens) if special_tokens is not None else llama3_special_tokens()
    ordinary = vocab_size - len(special_tokens)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=ordinary, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(list(corpus), trainer=trainer)
    trained = json.loads(raw.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(merge) for merge in trained["merges"]]
    filler = 0
    while len(vocab) < ordinary:  # unreachable by encoding (no merge makes them); decode as ASCII text
        vocab.setdefault(f"Ġfill{filler}", len(vocab))
        filler += 1
    if specials_first:  # ids 0 to k-1; `add_special_tokens` below then keeps these ids
        vocab = {
            **{token: i for i, token in enumerate(special_tokens)},
            **{t: i + len(special_tokens) for t, i in vocab.items()},
        }
    tokenizer_model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    tokenizer_model.add_special_tokens(special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model,
        bos_token=BOS,
        eos_token="<|eot_id|>",
        pad_token=PAD,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def save_random_llama(
    name: RandomConfigName,
    directory: Path,
    corpus: Iterable[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    special_tokens: Sequence[str] | None = None,
    specials_first: bool = False,
    context_length: int | None = None,
) -> Path:
    """Build the model on `device` in `dtype` (fast random init) and save model and tokenizer to `directory`.
    `context_length` replaces the configuration's `max_position_embeddings`."""
    vocab_size = VOCAB_SIZES[name]
    config = model_config(name, vocab_size)
    if context_length is not None:
        config.max_position_embeddings = context_length
    tokenizer = build_tokenizer(
        corpus,
        vocab_size,
        special_tokens,
        specials_first=specials_first,
        model_max_length=config.max_position_embeddings,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, expected {vocab_size}")
    config.bos_token_id = tokenizer.convert_tokens_to_ids(BOS)
    config.eos_token_id = tokenizer.convert_tokens_to_ids(list(EOS_TOKENS))
    config.pad_token_id = tokenizer.convert_tokens_to_ids(PAD)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def liven(model: LlamaForCausalLM, *, std: float = 0.5, seed: int = 1) -> LlamaForCausalLM:
    """Redraw the weight matrices at `std`. A tiny model at the initial std 0.02 repeats one token forever under
    greedy decoding; these weights give varied, reproducible text that runs for hundreds of tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()
