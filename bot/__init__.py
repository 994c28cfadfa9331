"""llamacord: a Discord bot that serves an open LLM in-process with continuous batching."""

__version__ = "0.1.0"
