"""The conservative token count for a remote model whose tokenizer is not available here."""

from __future__ import annotations

import pytest

from bot.engine.templating import PromptBuilder
from bot.engine.token_estimate import BYTES_PER_TOKEN, GENERATION_PROMPT, EstimatingTokenizer

TEXTS = ["", "a", "hello there, llama", "Émoji 🦙 and ünïcödé", "日本語のテキスト", "\x00<|eot_id|>[INST]"]


@pytest.mark.parametrize("text", TEXTS)
def test_decoding_gives_back_the_text_exactly(text: str) -> None:
    assert EstimatingTokenizer.decode(EstimatingTokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_a_token_is_a_run_of_whole_characters_of_at_least_three_bytes(text: str) -> None:
    pieces = [EstimatingTokenizer.decode([token]) for token in EstimatingTokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all(len(piece.encode()) >= BYTES_PER_TOKEN for piece in pieces[:-1])


def test_ascii_text_counts_one_token_per_three_bytes() -> None:
    assert len(EstimatingTokenizer.encode("x" * 30)) == 10
    assert len(EstimatingTokenizer.encode("x" * 31)) == 11


def test_the_framing_costs_tokens_per_message() -> None:
    tokenizer = EstimatingTokenizer()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith(GENERATION_PROMPT)
    assert len(tokenizer.encode(rendered)) >= 2 * 5  # about 6 tokens of framing a message


def test_a_prompt_budgeted_with_the_estimate_drops_the_oldest_turns() -> None:
    builder = PromptBuilder(EstimatingTokenizer(), max_prompt_tokens=120, context_length=10_000)
    chat = [{"role": "system", "content": "Be brief."}]
    for n in range(12):
        chat += [
            {"role": "user", "content": f"Alice: question {n} " + "x" * 30},
            {"role": "assistant", "content": "ok"},
        ]
    chat.append({"role": "user", "content": "Alice: the newest question"})
    prompt = builder.build(chat, max_new_tokens=16)
    assert prompt.num_tokens <= 120
    assert prompt.messages[0] == chat[0] and prompt.messages[-1] == chat[-1]
    assert prompt.dropped_messages > 0 and prompt.messages[1]["role"] == "user"
