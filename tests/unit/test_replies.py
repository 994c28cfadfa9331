"""The splitter, the message plan and the edit throttle, without Discord."""

from __future__ import annotations

import pytest

from bot.replies import DISCORD_LIMIT, EditThrottle, open_fence, plan_messages, split_message


def _words(text: str) -> list[str]:
    """The text's words, ignoring the fences the splitter adds, to check that nothing is lost or duplicated."""
    return [word for word in text.split() if not word.startswith("```")]


def _assert_valid_markdown_blocks(chunks: list[str]) -> None:
    for chunk in chunks:
        assert open_fence(chunk) is None, f"chunk ends inside a code block:\n{chunk[-200:]}"


def test_short_text_is_one_message() -> None:
    assert split_message("Hello there.") == ["Hello there."]
    assert split_message("") == []
    assert split_message("\n\n  \n") == []


def test_text_of_exactly_the_limit_is_not_split() -> None:
    text = "a" * DISCORD_LIMIT
    assert split_message(text) == [text]


def test_splits_at_paragraph_boundary_first() -> None:
    first = "First paragraph. " * 70  # ~1190 chars, sentences all over
    second = "Second paragraph words " * 60
    chunks = split_message(first.strip() + "\n\n" + second.strip())
    assert chunks[0] == first.strip()
    assert chunks[1] == second.strip()


def test_prefers_sentence_end_over_word() -> None:
    sentence = "This sentence is exactly here. "
    text = sentence * 100  # 3100 characters, no newlines
    chunks = split_message(text)
    assert all(len(chunk) <= DISCORD_LIMIT for chunk in chunks)
    assert chunks[0].endswith("here.")
    assert chunks[1].startswith("This sentence")
    assert _words(" ".join(chunks)) == _words(text)


def test_falls_back_to_words_then_hard_cut() -> None:
    words = "word " * 700  # no sentence ends
    chunks = split_message(words)
    assert all(len(chunk) <= DISCORD_LIMIT for chunk in chunks)
    assert all(chunk.endswith("word") and chunk.startswith("word") for chunk in chunks)
    assert _words(" ".join(chunks)) == _words(words)

    unbroken = "x" * 4500
    chunks = split_message(unbroken)
    assert [len(chunk) for chunk in chunks] == [2000, 2000, 500]
    assert "".join(chunks) == unbroken


def test_does_not_split_at_an_early_boundary() -> None:
    # A paragraph break near the start would make a tiny first message; a later space is better.
    text = "Hi.\n\n" + "lorem ipsum " * 300
    chunks = split_message(text)
    assert len(chunks[0]) > DISCORD_LIMIT // 2


def test_code_block_is_closed_and_reopened_with_its_language() -> None:
    code = "\n".join(f"    value_{i} = compute({i})  # step {i}" for i in range(120))
    text = "Here is the code:\n\n```python\n" + code + "\n```\n\nThat is all."
    chunks = split_message(text)
    assert len(chunks) >= 2
    assert all(len(chunk) <= DISCORD_LIMIT for chunk in chunks)
    _assert_valid_markdown_blocks(chunks)
    assert chunks[0].endswith("\n```")
    for chunk in chunks[1:]:
        assert chunk.startswith("```python\n")
    # Every code line arrives once, whole, and in order.
    lines = [line for chunk in chunks for line in chunk.splitlines() if "value_" in line]
    assert lines == code.splitlines()
    assert chunks[-1].endswith("That is all.")


def test_split_before_a_code_block_does_not_leave_an_empty_block() -> None:
    prose = "Some words here " * 110  # ~1760 characters
    code = "\n".join(f"line_{i}()" for i in range(80))
    chunks = split_message(prose.strip() + "\n```js\n" + code + "\n```")
    _assert_valid_markdown_blocks(chunks)
    assert all("```js\n```" not in chunk for chunk in chunks)
    assert all(len(chunk) <= DISCORD_LIMIT for chunk in chunks)


def test_inline_triple_backticks_are_not_fences() -> None:
    text = ("Use ```inline``` like this. " * 80).strip()
    chunks = split_message(text)
    assert all(not chunk.endswith("\n```") for chunk in chunks)
    assert " ".join(chunks).split() == text.split()


def test_longer_fence_needs_a_closing_fence_as_long() -> None:
    assert open_fence("````md\n```\nstill inside") == "````md"
    assert open_fence("````md\n```\n````\nout") is None
    assert open_fence("```\ncode\n```") is None
    assert open_fence("```rust\nfn main() {}") == "```rust"


@pytest.mark.parametrize("limit", [400, 777, DISCORD_LIMIT])
def test_every_chunk_fits_and_blocks_stay_valid(limit: int) -> None:
    parts = []
    for i in range(30):
        parts.append(f"Paragraph {i} says something. " * (i % 7 + 1))
        if i % 4 == 0:
            parts.append("```sql\n" + "\n".join(f"SELECT {j} FROM t{i};" for j in range(i * 3)) + "\n```")
    text = "\n\n".join(parts)
    chunks = split_message(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    _assert_valid_markdown_blocks(chunks)
    assert _words("\n".join(chunks)) == _words(text)


def test_earlier_chunks_do_not_change_as_the_text_grows() -> None:
    full = "\n".join(f"Line {i}: " + "blah " * (i % 13) for i in range(400))
    previous: list[str] = []
    for end in range(0, len(full), 97):
        chunks = split_message(full[:end])
        # Every chunk but the last is final once it exists.
        assert chunks[: max(len(previous) - 1, 0)] == previous[: max(len(previous) - 1, 0)]
        previous = chunks


def test_plan_edits_changed_messages_and_sends_new_ones() -> None:
    plan = plan_messages(["a", "b"], ["a", "b2", "c", "d"])
    assert plan.edits == [(1, "b2")]
    assert plan.sends == ["c", "d"]
    assert plan_messages(["a"], ["a"]).edits == []
    assert plan_messages([], ["x"]).sends == ["x"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_allows_one_flush_per_interval() -> None:
    clock = FakeClock()
    throttle = EditThrottle(1.0, clock=clock)
    assert throttle.ready()  # the first flush is immediate
    throttle.flushed()
    assert not throttle.ready()
    assert throttle.delay() == pytest.approx(1.0)
    clock.now += 0.4
    assert throttle.delay() == pytest.approx(0.6)
    clock.now += 0.6
    assert throttle.ready()
    throttle.flushed()
    clock.now += 0.99
    assert not throttle.ready()
    assert throttle.delay() == pytest.approx(0.01)
