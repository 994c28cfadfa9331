"""Incremental decoding of generated token ids into text deltas that never split a multi-byte character.

A byte-level BPE token can hold part of a UTF-8 character (an emoji is often two or three tokens), and decoding
one token at a time would print U+FFFD. Decoding each new token alone also loses context: some tokenizers
(SentencePiece) drop or add a leading space depending on what came before. So, as vLLM and TGI do, we decode a
short window that starts a few tokens back (the prefix) and emit only the text past the prefix's own decoding,
holding it back while it ends in U+FFFD, which means a character is still incomplete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The one tokenizer method the detokenizer needs (any Hugging Face tokenizer has it)."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. Work per call is bounded by the window, not the reply."""

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = 0  # tokens before this one have been emitted as text

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new token ids; return the text they complete ("" while a character is still incomplete)."""
        self._token_ids.extend(token_ids)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back at the end of generation, U+FFFD included if the model stopped mid-character."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]
