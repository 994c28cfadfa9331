"""Errors the engine raises. Their `str()` is short and fit to show a user; details go to the log."""

# What a user reads when the engine has no room for another request, whichever backend runs.
BUSY_MESSAGE = "I'm busy with other conversations right now. Please try again in a moment."
# What a request still in flight ends with when the engine shuts down.
SHUTTING_DOWN = "The bot is shutting down."


class EngineError(Exception):
    """Base class for every engine failure."""


class ModelLoadError(EngineError):
    """The model named by MODEL could not be resolved or loaded (gated, offline, missing, corrupt)."""


class EngineBusyError(EngineError):
    """The waiting queue is full; the caller should tell the user to try again shortly."""

    def __init__(self, message: str = BUSY_MESSAGE) -> None:
        super().__init__(message)


class GenerationError(EngineError):
    """Generation failed for this request; the engine keeps serving the others."""


class PromptError(EngineError):
    """The conversation cannot become a prompt: the chat template failed, or the system prompt alone is over budget."""
