"""Incremental decoding: deltas add up to the full decode and never carry half a character."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bot.engine.local.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

MULTIBYTE_TEXTS = ["Llamas 🦙 and ünïcödé", "日本語のテキスト", "🦙🦙 ok", "plain ascii text"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _deltas(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], chunk: int) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)]
    deltas.append(detokenizer.flush())
    return deltas


def test_the_tiny_tokenizer_splits_characters_across_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Guards the tests below: they only mean something if some token holds part of a character."""
    token_ids = tokenizer.encode("🦙", add_special_tokens=False)
    assert len(token_ids) > 1
    assert REPLACEMENT_CHAR in tokenizer.decode(token_ids[:1])


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_deltas_rebuild_the_text_without_broken_characters(
    tokenizer: PreTrainedTokenizerBase, text: str, chunk: int
) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _deltas(tokenizer, token_ids, chunk)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_text_is_held_back_until_the_character_completes(tokenizer: PreTrainedTokenizerBase) -> None:
    prefix_ids = tokenizer.encode("ok ", add_special_tokens=False)
    emoji_ids = tokenizer.encode("🦙", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(prefix_ids) == "ok "
    assert detokenizer.push(emoji_ids[:-1]) == ""
    assert detokenizer.push(emoji_ids[-1:]) == "🦙"
    assert detokenizer.flush() == ""


def test_flush_returns_an_unfinished_character_at_the_end(tokenizer: PreTrainedTokenizerBase) -> None:
    emoji_ids = tokenizer.encode("🦙", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(emoji_ids[:1]) == ""
    assert detokenizer.flush() == tokenizer.decode(emoji_ids[:1])
    assert detokenizer.flush() == ""


def test_special_tokens_are_not_text(tokenizer: PreTrainedTokenizerBase) -> None:
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(tokenizer.encode("hi", add_special_tokens=False)) == "hi"
    assert detokenizer.push([eot]) == ""
    assert detokenizer.push(tokenizer.encode(" there", add_special_tokens=False)) == " there"


SENTENCEPIECE_PIECES = {0: "▁Hello", 1: "▁wor", 2: "ld", 3: "!"}


class _SentencePieceLike:
    """Decodes like SentencePiece: a word-start marker becomes a space, except at the start of the decoded text."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return "".join(SENTENCEPIECE_PIECES[i] for i in token_ids).replace("▁", " ").removeprefix(" ")


def test_word_spaces_survive_token_by_token_decoding() -> None:
    """Decoding each token alone would print "Helloworld!"; the prefix window keeps the space."""
    detokenizer = IncrementalDetokenizer(_SentencePieceLike())
    deltas = [detokenizer.push([token_id]) for token_id in range(4)]
    assert "".join(deltas) + detokenizer.flush() == "Hello world!"
