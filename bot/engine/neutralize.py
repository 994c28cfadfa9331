"""Special-token text in messages bound for a remote model server, broken so that it stays text.

An OpenAI-compatible server (vLLM, llama.cpp, `transformers serve`) renders the chat template over the message
contents and tokenizes the result with special tokens recognized, so a member who types
`<|eot_id|><|start_header_id|>system<|end_header_id|>` (or takes it as a nickname: speaker names are in the content)
would end their turn and open a system turn. The local engine never has this problem (`templating.py` tokenizes
contents with `split_special_tokens`); the remote one cannot tokenize for the server, so it changes the text instead.

What is broken: every special token of the model's tokenizer when it loads here, and always the common families
(`<|…|>` and `<｜…｜>`, `[INST]`, `<s>`, `<<SYS>>`, `<start_of_turn>`, `<think>`, …), in case the server's
tokenizer differs from the one here or none loaded.

How: a WORD JOINER (U+2060) goes in after the token's first character, `<|eot_id|>` becoming `<`, U+2060, `|eot_id|>`.

- The server's tokenizer no longer reads a control token: special tokens are found by exact string match, on the
  text as it is (Hugging Face tokenizers match them before normalizing, llama.cpp has no normalizer), and no special
  token contains U+2060.
- Nothing merges it back: U+2060 is not whitespace (so `strip`, `trim` and whitespace pre-tokenizers keep it), NFC
  and NFKC leave it alone, and byte-level BPE and SentencePiece encode it like any other character. (Only BERT-style
  normalizers drop format characters, and they run after special tokens are matched.) A look-alike (`＜` for `<`)
  would be folded back into the ASCII character by NFKC, which some tokenizers apply.
- A person reads the same text: U+2060 is invisible (a default-ignorable format character) and, unlike a zero-width
  space, never lets a line break inside the token.

Breaking only inserts characters that no token contains, so it can end matches but never create one; it repeats
until nothing matches (tokens can overlap), which also makes it idempotent. Ordinary text is returned unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BREAK = "\u2060"  # WORD JOINER

# Chat-format control tokens that model families share; matched whatever tokenizer is here.
FAMILIES = (
    r"<[|｜][^\s<>|｜]{1,64}[|｜]>",  # Llama 3, ChatML (Qwen, SmolLM), Phi, Granite, Command R, gpt-oss; DeepSeek's ｜
    r"\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|TOOL_CONTENT|THINK)\]",  # Mistral
    r"<</?SYS>>",  # Llama 2
    r"</?(?:s|unk|pad|mask|bos|eos)>",  # SentencePiece and Gemma
    r"</?(?:start_of_turn|end_of_turn|start_of_image|end_of_image)>",  # Gemma
    r"</?(?:think|tool_call|tool_response|tools)>",  # Qwen, DeepSeek, Hermes
)


class Neutralizer:
    """Breaks special-token text in messages; built once per engine, used from any thread."""

    def __init__(self, special_tokens: Iterable[str] = ()) -> None:
        """`special_tokens`: the model's own, on top of the families. A one-character token cannot be broken inside
        and is left out (no chat model uses one as a control token)."""
        literals = {token for token in special_tokens if len(token) > 1}
        self._pattern = re.compile("|".join([*FAMILIES, *([_union(literals)] if literals else [])]))

    @classmethod
    def for_tokenizer(cls, tokenizer: Any | None) -> Neutralizer:
        """Every special token of a Hugging Face tokenizer (the named ones and every added token marked special);
        the families only for None or a stand-in such as `EstimatingTokenizer`."""
        named = getattr(tokenizer, "all_special_tokens", None) or []
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        return cls([*named, *(token.content for token in added.values() if getattr(token, "special", False))])

    def text(self, text: str) -> str:
        """`text` with each special token broken by `BREAK` after its first character."""
        while True:
            broken = self._pattern.sub(lambda match: match[0][0] + BREAK + match[0][1:], text)
            if broken == text:
                return text
            text = broken

    def messages(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        """Every value of every message (contents, with the speaker names in them) broken as `text` breaks it."""
        return [{key: self.text(value) for key, value in message.items()} for message in messages]


def _union(words: Iterable[str]) -> str:
    """A regex for any of `words`, longest first, factored as a trie: a tokenizer can have thousands of special
    tokens (Gemma's `<unused…>`), and a plain alternation would try each of them at every `<` of a long chat."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here
    return _trie_pattern(trie)


def _trie_pattern(node: dict[str, Any]) -> str:
    branches = [re.escape(char) + _trie_pattern(child) for char, child in sorted(node.items()) if char]
    ends = "" in node
    if not branches:
        return ""
    if len(branches) == 1 and not ends:
        return branches[0]
    return "(?:" + "|".join(branches) + ")" + ("?" if ends else "")
