"""Durable conversation history and channel settings in SQLite. The only package that contains SQL."""
