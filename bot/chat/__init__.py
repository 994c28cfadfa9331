"""The turn pipeline: one user turn from history to prompt to streamed reply to store, shared by every front end
(the Discord adapter and the terminal). Pure rules: no discord.py, no torch."""
