"""`ModelInfo`: a look inside the loaded model and tokenizer, as one object for `/info` and `llamacord info`.

Both print the same lines, which name the model (the hub id, or the directory or file name) and never its path on the
host: `/info` answers anyone in a server, and one rendering keeps the two alike. An operator at the terminal has the
path already: it is MODEL, and the "loading ..." log line names it in full.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bot.engine.local.kv_cache import KVCacheInfo
from bot.engine.local.loader import LoadedModel

PREVIEW_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Alice: Hi!"},
]


@dataclass(frozen=True, slots=True)
class SpecialToken:
    text: str
    id: int

    def __str__(self) -> str:
        return f"{self.text} ({self.id})"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    source: str  # the hub id, or the name of the directory or .gguf file MODEL named: never a path on the host
    architecture: str
    parameter_count: int  # tied weights counted once
    dtype: str
    device: str
    memory_bytes: int  # parameters and buffers
    layers: int
    attention_heads: int
    kv_heads: int
    hidden_size: int
    context_length: int
    vocab_size: int  # the tokenizer's, added tokens included
    bos: SpecialToken | None
    eos: tuple[SpecialToken, ...]  # every id generation stops on (Llama 3.2 has several)
    pad: SpecialToken | None
    chat_template_origin: str  # "tokenizer" or the CHAT_TEMPLATE_PATH file's name
    chat_template: str  # the Jinja source
    chat_template_preview: str  # a short chat rendered with it: what the model really sees
    generation_config: dict[str, Any]  # the values that differ from transformers' defaults
    kv_cache: KVCacheInfo | None = None  # once the engine has allocated it
    attention: str | None = None  # what the engine runs (`AttentionChoice.describe`)

    def lines(self) -> list[str]:
        """Human-readable lines for a terminal or a Discord code block."""
        eos = ", ".join(str(token) for token in self.eos) or "none"
        return [
            f"model:          {self.source}",
            f"architecture:   {self.architecture}",
            f"parameters:     {self.parameter_count / 1e6:.1f}M ({self.parameter_count:,})",
            f"dtype, device:  {self.dtype} on {self.device}",
            f"memory:         {self.memory_bytes / 2**20:.1f} MiB",
            f"layers:         {self.layers}",
            f"heads:          {self.attention_heads} attention, {self.kv_heads} key/value",
            f"hidden size:    {self.hidden_size}",
            f"context length: {self.context_length} tokens",
            f"vocab size:     {self.vocab_size}",
            f"bos token:      {self.bos or 'none'}",
            f"eos tokens:     {eos}",
            f"pad token:      {self.pad or 'none'}",
            f"chat template:  from {self.chat_template_origin}, {len(self.chat_template)} characters",
            f"  renders as:   {self.chat_template_preview!r}",
            f"generation:     {json.dumps(self.generation_config, sort_keys=True)}",
            f"attention:      {self.attention or 'not chosen'}",
            f"kv cache:       {self.kv_cache.describe() if self.kv_cache else 'not allocated'}",
        ]


def collect_model_info(loaded: LoadedModel) -> ModelInfo:
    """Read everything from the model's config, generation config and tokenizer (no forward pass)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config.get_text_config()
    generation = model.generation_config
    heads = config.num_attention_heads
    eos_ids = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    generation_values = {
        key: value
        for key, value in generation.to_diff_dict().items()
        if not key.startswith("_") and key != "transformers_version"
    }
    return ModelInfo(
        source=loaded.name,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        parameter_count=sum(parameter.numel() for parameter in model.parameters()),
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        memory_bytes=model.get_memory_footprint(),
        layers=config.num_hidden_layers,
        attention_heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        hidden_size=config.hidden_size,
        context_length=config.max_position_embeddings,
        vocab_size=len(tokenizer),
        bos=_special(tokenizer, tokenizer.bos_token_id),
        eos=tuple(token for token in (_special(tokenizer, i) for i in eos_ids) if token is not None),
        pad=_special(tokenizer, tokenizer.pad_token_id),
        chat_template_origin=loaded.chat_template_origin,
        chat_template=tokenizer.chat_template or "",
        chat_template_preview=_preview(tokenizer),
        generation_config=generation_values,
    )


def _special(tokenizer: Any, token_id: int | None) -> SpecialToken | None:
    return None if token_id is None else SpecialToken(tokenizer.convert_ids_to_tokens(token_id), token_id)


def _preview(tokenizer: Any) -> str:
    if not tokenizer.chat_template:
        return "(no chat template)"
    try:
        return tokenizer.apply_chat_template(PREVIEW_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template that rejects a system turn, say; /info should still answer
        return f"(the template fails on a system + user chat: {error})"
