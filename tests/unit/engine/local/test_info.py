from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.engine.local.info import ModelInfo, SpecialToken, collect_model_info
from bot.engine.local.loader import LoadedModel, load_model
from bot.settings import Settings
from tests.support.tiny_model import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(Settings(_env_file=None, model=str(tiny_model_dir), device="cpu"))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def info(loaded: LoadedModel) -> ModelInfo:
    return collect_model_info(loaded)


def llama_parameter_count(config: object) -> int:
    """Llama's parameters from its config, the tied output embedding counted once."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers  # type: ignore[attr-defined]
    head_dim = h // config.num_attention_heads  # type: ignore[attr-defined]
    kv = config.num_key_value_heads * head_dim  # type: ignore[attr-defined]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    return config.vocab_size * h + layers * per_layer + h  # type: ignore[attr-defined]


def test_architecture_and_size(info: ModelInfo, loaded: LoadedModel) -> None:
    config = loaded.model.config
    assert info.source == loaded.name
    assert info.architecture == "LlamaForCausalLM"
    assert info.parameter_count == llama_parameter_count(config)
    assert info.parameter_count == sum(p.numel() for p in loaded.model.parameters())
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert info.memory_bytes == 4 * info.parameter_count + sum(
        b.numel() * b.element_size() for b in loaded.model.buffers()
    )
    assert (info.layers, info.attention_heads, info.kv_heads, info.hidden_size) == (2, 2, 1, 16)
    assert info.context_length == config.max_position_embeddings
    assert info.vocab_size == len(loaded.tokenizer)


def test_special_tokens_include_every_eos_id(info: ModelInfo, loaded: LoadedModel) -> None:
    ids = {token: loaded.tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert info.bos == SpecialToken("<|begin_of_text|>", ids["<|begin_of_text|>"])
    assert info.pad == SpecialToken("<|finetune_right_pad_id|>", ids["<|finetune_right_pad_id|>"])
    eos = {token: ids[token] for token in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert {token.text: token.id for token in info.eos} == eos
    assert [token.id for token in info.eos] == loaded.model.generation_config.eos_token_id


def test_chat_template_and_generation_config(info: ModelInfo, loaded: LoadedModel) -> None:
    assert info.chat_template == loaded.tokenizer.chat_template
    assert info.chat_template_origin == "tokenizer"
    assert info.chat_template_preview == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAlice: Hi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    generation = loaded.model.generation_config
    assert info.generation_config["temperature"] == generation.temperature
    assert info.generation_config["top_p"] == generation.top_p
    assert info.generation_config["eos_token_id"] == generation.eos_token_id
    assert not any(key.startswith("_") or key == "transformers_version" for key in info.generation_config)


def test_lines_show_every_field(info: ModelInfo) -> None:
    text = "\n".join(info.lines())
    for expected in [
        info.source,
        f"{info.parameter_count:,}",
        "float32 on cpu",
        f"vocab size:     {info.vocab_size}",
        f"context length: {info.context_length} tokens",
        "2 attention, 1 key/value",
        ", ".join(f"{token.text} ({token.id})" for token in info.eos),
        repr(info.chat_template_preview),
        '"top_p": 0.9',
    ]:
        assert expected in text


def test_lines_name_the_model_without_its_path_on_the_host(info: ModelInfo, tiny_model_dir: Path) -> None:
    text = "\n".join(info.lines())
    assert f"model:          {tiny_model_dir.name}\n" in text
    assert str(tiny_model_dir.parent) not in text


def test_info_is_frozen(info: ModelInfo) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.layers = 3  # type: ignore[misc]


def test_a_template_that_rejects_the_preview_chat_does_not_break_info(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = "{{ raise_exception('no system role here') }}"
    try:
        info = collect_model_info(loaded)
    finally:
        tokenizer.chat_template = original
    assert "no system role here" in info.chat_template_preview
