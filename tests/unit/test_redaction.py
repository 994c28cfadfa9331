"""URLs are shown without credentials or query strings, and models without their path on the host."""

from __future__ import annotations

import pytest

from bot.redaction import model_name, public_urls


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://llamacord:hunter2@127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("https://token@proxy.example/v1?api_key=k&x=1#frag", "https://proxy.example/v1"),
        ("http://user:p@ss@host/v1", "http://host/v1"),  # an unencoded @ in the password: the last one ends it
        ("http://[::1]:8000/v1?key=k", "http://[::1]:8000/v1"),
        ("postgresql://llamacord:pw@db:5432/llamacord", "postgresql://db:5432/llamacord"),
        (
            "https://discord.com/api/v10/webhooks/1/t/messages/@original",
            "https://discord.com/api/v10/webhooks/1/t/messages/@original",
        ),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ],
)
def test_a_url_loses_its_credentials_and_query(url: str, shown: str) -> None:
    assert public_urls(url) == shown


def test_every_url_in_a_line_is_made_public_and_the_rest_is_kept() -> None:
    line = "POST http://a:secret@h/v1/chat?key=k failed; retry 'https://b:secret2@g/x' or mail bob@example.com"
    assert public_urls(line) == "POST http://h/v1/chat failed; retry 'https://g/x' or mail bob@example.com"
    assert public_urls('{"url":"http://h/p","who":"a@b"}') == '{"url":"http://h/p","who":"a@b"}'


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("/srv/models/Llama-3.2-1B-Instruct/", "Llama-3.2-1B-Instruct"),
        ("/home/me/.cache/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("~/models/tiny", "tiny"),
        ("C:\\models\\tiny.gguf", "tiny.gguf"),
        ("smollm2", "smollm2"),
    ],
)
def test_a_model_on_the_host_is_shown_by_its_name(model: str, shown: str) -> None:
    assert model_name(model) == shown
