"""The generation engine: model loading, chat templating within a token budget, and the batching executor."""
