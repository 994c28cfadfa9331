"""Render a conversation with the chat template into token ids, within the token budget.

Special-token injection: if the rendered prompt were tokenized as one string, a user who types `<|eot_id|>` would
get the control token and could forge a system or assistant turn. So each message's content is rendered between
random markers, the rendered text is cut at the markers, and the template's own text is tokenized with special
tokens recognized while each content is tokenized with `split_special_tokens=True`: plain text, whatever it holds.
A template that rewrites content so the markers break is refused with a clear error; it never silently lets
special tokens through.

Contents are stripped before rendering (Llama 3's template trims them; the markers would stop `trim` from seeing
the whitespace, and leading or trailing whitespace carries no meaning in a chat).

Budget: the prompt holds at most `max_prompt_tokens` and leaves `max_new_tokens` free in the context window. When a
conversation no longer fits, the oldest turns go in one large step, down to `WINDOW_KEEP` of the budget, cut only
before a user turn so the history still starts with a question; the system prompt and the newest message always
stay. Dropping just enough to fit would change the prompt's first tokens on every later turn and no cached prefix
would ever be reused; after a large step the prompt starts on the same message for many turns (the turn pipeline
keeps that start in the store). Each content is tokenized once and the cut is binary-searched, so a long history
costs O(n log n) template rendering, not O(n²).
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bot.engine.api import Prompt
from bot.engine.errors import ModelLoadError, PromptError

# Replaces the middle of a newest message that alone is over budget. The start is kept because it holds the
# speaker's name and what the message is about; the end is kept because a pasted text is usually followed by the
# actual question.
TRUNCATION_MARKER = "\n[… cut …]\n"

EXAMPLE_TEMPLATE = Path(__file__).parent / "templates" / "plain.jinja"

# The share of the prompt budget a conversation that overflows it is cut down to. The rest is room for the turns to
# come, each of which then reuses the cached prefix; see docs/engine.md ("Context windows") for the figures.
WINDOW_KEEP = 0.5


def read_chat_template(path: Path) -> str:
    """The Jinja source of a CHAT_TEMPLATE_PATH file."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"CHAT_TEMPLATE_PATH {path} cannot be read: {error}") from error


class PromptBuilder:
    """Turns chat messages into a `Prompt` for one tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: Any,
        max_prompt_tokens: int,
        context_length: int,
        chat_template: str | None = None,
        window_keep: float = WINDOW_KEEP,
    ) -> None:
        """`window_keep`: the share of the budget an overflowing conversation is cut down to (1.0 cuts just enough
        to fit, which moves the prompt's start on every later turn: the benchmark's "before")."""
        self._tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.context_length = context_length
        self.window_keep = window_keep
        self.chat_template: str = chat_template or tokenizer.chat_template or ""
        if not self.chat_template:
            raise ModelLoadError(
                "The tokenizer has no chat template. Set CHAT_TEMPLATE_PATH to a Jinja template file "
                f"(an example: {EXAMPLE_TEMPLATE})."
            )
        try:
            self._segments([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], range(2))
        except PromptError as error:
            raise ModelLoadError(f"The chat template is unusable: {error}") from error

    def build(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Prompt:
        """Render `messages` (system first if any, newest last) so that the prompt plus `max_new_tokens` fits."""
        if not messages:
            raise ValueError("a prompt needs at least one message")
        chat = [{"role": message["role"], "content": message["content"].strip()} for message in messages]
        budget = min(self.max_prompt_tokens, self.context_length - max_new_tokens)
        if budget <= 0:
            raise PromptError(
                f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's context window "
                f"({self.context_length} tokens)."
            )
        contents = self._encode([message["content"] for message in chat], plain=True)
        first = 1 if chat[0]["role"] == "system" and len(chat) > 1 else 0
        newest = len(chat) - 1
        # Drop chat[first:cut]. A cut lands before a user turn, or drops the whole history.
        cuts = [c for c in range(first, newest + 1) if c in (first, newest) or chat[c]["role"] == "user"]

        def kept(cut: int) -> list[int]:
            return [*range(first), *range(cut, len(chat))]

        def token_ids(cut: int) -> list[int]:
            return self._assemble(chat, kept(cut), contents)

        everything = token_ids(cuts[0])
        if len(everything) <= budget:
            return Prompt(everything, len(everything), 0, False, chat)
        low, high = 1, len(cuts) - 1
        best = token_ids(cuts[high]) if high else everything
        if len(best) > budget:
            return self._truncate_newest(chat, kept(cuts[high]), contents, best, budget, cuts[high] - first)
        target = int(budget * self.window_keep)
        while low < high:  # the smallest cut down to the target: dropping more turns never adds tokens
            middle = (low + high) // 2
            ids = token_ids(cuts[middle])
            if len(ids) <= target:
                high, best = middle, ids
            else:
                low = middle + 1
        cut = cuts[high]
        return Prompt(best, len(best), cut - first, False, [chat[i] for i in kept(cut)])

    def _truncate_newest(
        self,
        chat: list[dict[str, str]],
        indices: list[int],
        contents: list[list[int]],
        ids: list[int],
        budget: int,
        dropped: int,
    ) -> Prompt:
        newest = len(chat) - 1
        marker = self._encode([TRUNCATION_MARKER], plain=True)[0]
        content = contents[newest]
        keep = len(content) - (len(ids) - budget) - len(marker)
        if keep < 1:
            raise PromptError(
                f"The system prompt and chat template alone need {len(ids) - len(content)} of the {budget} prompt "
                "tokens, leaving no room for the message. Shorten the system prompt (/system) or lower max_new_tokens."
            )
        head, tail = keep - keep // 2, keep // 2
        cut_content = content[:head] + marker + content[len(content) - tail :]
        ids = self._assemble(chat, indices, [*contents[:newest], cut_content])
        if len(ids) > budget:
            raise PromptError("The chat template does not place the newest message where it can be shortened.")
        rendered = [chat[i] for i in indices[:-1]]
        rendered.append({"role": chat[newest]["role"], "content": self._tokenizer.decode(cut_content)})
        return Prompt(ids, len(ids), dropped, True, rendered)

    def _assemble(self, chat: list[dict[str, str]], indices: list[int], contents: list[list[int]]) -> list[int]:
        """Token ids of the chosen messages: template text with special tokens, contents as plain text."""
        segments = self._segments(chat, indices)
        template_ids = self._encode([text for text, _ in segments], plain=False)
        ids: list[int] = []
        for piece, (_, index) in zip(template_ids, segments, strict=True):
            ids += piece
            if index is not None:
                ids += contents[index]
        return ids

    def _segments(self, chat: list[dict[str, str]], indices: Sequence[int]) -> list[tuple[str, int | None]]:
        """The rendered template as (template text, index of the content that follows it or None) pairs.

        The markers carry a fresh random nonce, so a user cannot type one. It is digits only, so that a filter such
        as `upper` changes the content (and is caught) but cannot hide the marker from the leftover check.
        """
        nonce = f"{secrets.randbits(128):039d}"
        marked = [{"role": chat[i]["role"], "content": f"⟦{nonce}:{i}⟧{chat[i]['content']}⟦/{nonce}⟧"} for i in indices]
        try:
            text = self._tokenizer.apply_chat_template(
                marked, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # Jinja errors, and the template's own raise_exception()
            raise PromptError(f"The chat template failed: {error}") from error
        segments: list[tuple[str, int | None]] = []
        position = 0
        for match in re.finditer(rf"⟦{nonce}:(\d+)⟧.*?⟦/{nonce}⟧", text, flags=re.DOTALL):
            index = int(match.group(1))
            if index >= len(chat) or match.group(0) != f"⟦{nonce}:{index}⟧{chat[index]['content']}⟦/{nonce}⟧":
                raise PromptError("The chat template changes message text, so user text cannot be kept plain.")
            segments.append((text[position : match.start()], index))
            position = match.end()
        segments.append((text[position:], None))
        if any(nonce in piece for piece, _ in segments):
            raise PromptError("The chat template changes message text, so user text cannot be kept plain.")
        return segments

    def _encode(self, texts: list[str], *, plain: bool) -> list[list[int]]:
        return encode(self._tokenizer, texts, plain=plain)


# `split_special_tokens` is a flag on the shared Rust tokenizer, set just before each encode: two threads encoding
# at once could read user text with control tokens recognized. Every encode of ours holds this lock.
_ENCODE_LOCK = threading.Lock()


def encode(tokenizer: Any, texts: list[str], *, plain: bool) -> list[list[int]]:
    """Token ids of each text, without BOS; with `plain`, control-token look-alikes stay plain text."""
    if not texts:
        return []
    with _ENCODE_LOCK:
        encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=plain)
    return [list(ids) for ids in encoded["input_ids"]]


def tokenize_plain(tokenizer: Any, text: str) -> list[tuple[int, str]]:
    """(id, text) of each token of `text`, read as user text is read: for /tokenize."""
    return [(token_id, tokenizer.decode([token_id])) for token_id in encode(tokenizer, [text], plain=True)[0]]
