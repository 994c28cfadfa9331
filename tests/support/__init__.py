"""What the tests run against: a fake Discord, a real OpenAI-compatible server, the tiny model and the bot harness."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
