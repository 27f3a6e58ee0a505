"""The one exception family of llmctl: the CLI prints it as a red line, the server as OpenAI JSON."""

from __future__ import annotations


class LlmctlError(Exception):
    """Base of every error llmctl raises on purpose. `hint` says what to do about it."""

    # HTTP status the server answers with when this error reaches a request.
    status_code: int = 500

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(LlmctlError, ValueError):
    """A setting (flag, recipe field, config value) is invalid."""

    status_code = 400


class ModelLoadError(LlmctlError):
    """A model path, config or weight file cannot be used."""

    status_code = 400


class AssetError(LlmctlError):
    """An offline asset package (default model, corpus, MMLU) is missing."""


class NotImplementedYet(LlmctlError):
    """A command or option that exists in the interface but is not built yet."""

    status_code = 501


class InvalidRequestError(LlmctlError, ValueError):
    """A request cannot be served as asked (bad sampling value, prompt too long)."""

    status_code = 400


class CacheCapacityError(LlmctlError):
    """The KV cache cannot hold what is asked (not even one sequence fits)."""


class QuantizationError(LlmctlError):
    """GPTQ cannot proceed (bad group size, failed factorization, bad checkpoint)."""


class EngineDeadError(LlmctlError):
    """The engine cannot step any more (a device error, a broken model); the server must restart."""

    status_code = 503


class RequestFailedError(LlmctlError):
    """The engine failed one request inside a step; the others go on."""


class ShuttingDownError(LlmctlError):
    """The server is stopping: it takes no new request, and one still running past the grace
    period is ended with this (an OpenAI-style 503, or an error event in a stream)."""

    status_code = 503
