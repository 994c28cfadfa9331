"""A conservative stand-in tokenizer, for budgeting prompts to a remote model whose tokenizer is not available here.

It follows the subset of the Hugging Face tokenizer interface that `PromptBuilder` uses, so a remote prompt is
trimmed exactly as a local one is (oldest turns first, cut before a user turn, the newest message's middle cut
when it alone is too long). Only the counting is estimated:

- text: one token per 3 UTF-8 bytes, rounded up per message. Llama 3's tokenizer averages about 4 bytes a token
  on English, code and most European text, so this over-counts there by about a third; CJK text is 3 bytes a
  character and close to one token a character, so it stays about right.
- framing: `MESSAGE_FRAMING` below costs about 6 tokens a message (Llama 3's template costs 5).

Scripts that a model's vocabulary covers poorly can take more than one token per 3 bytes. A prompt that is then
over the server's context window is refused by the server with a 400, which the user sees as a clear error.

A "token" here is a run of whole characters of at least 3 bytes, and its id is those bytes as an integer, so
`decode` is exact and nothing is kept between calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

BYTES_PER_TOKEN = 3
# One message as the estimate frames it; `{content}` is the message text.
MESSAGE_FRAMING = "<|{role}|>\n{content}<|end|>\n"
GENERATION_PROMPT = "<|assistant|>\n"


class EstimatingTokenizer:
    """Counts about one token per 3 UTF-8 bytes; a drop-in for the tokenizer argument of `PromptBuilder`."""

    # PromptBuilder requires a chat template; this one is the framing above, which `apply_chat_template` applies.
    chat_template = MESSAGE_FRAMING

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True, **_: object
    ) -> str:
        """The generic framing, whatever `chat_template` is passed: the server applies the model's own."""
        text = "".join(MESSAGE_FRAMING.format(role=m["role"], content=m["content"]) for m in messages)
        return text + (GENERATION_PROMPT if add_generation_prompt else "")

    def __call__(self, texts: Sequence[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(text) for text in texts]}

    @staticmethod
    def encode(text: str) -> list[int]:
        ids: list[int] = []
        piece = b""
        for char in text:
            piece += char.encode("utf-8")
            if len(piece) >= BYTES_PER_TOKEN:
                ids.append(int.from_bytes(b"\x01" + piece, "big"))  # the 0x01 keeps leading zero bytes
                piece = b""
        if piece:
            ids.append(int.from_bytes(b"\x01" + piece, "big"))
        return ids

    @staticmethod
    def decode(ids: Sequence[int]) -> str:
        return b"".join(i.to_bytes((i.bit_length() + 7) // 8, "big")[1:] for i in ids).decode("utf-8")
