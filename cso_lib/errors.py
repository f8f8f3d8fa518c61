"""The project's exceptions: one base class, small subclasses."""


class CSOError(Exception):
    """Base class of every error raised by cso."""


class ConfigError(CSOError):
    """The configuration or a command-line override is invalid."""


class InputError(CSOError):
    """An input path or table cannot be read at all (single bad records go to quarantine instead)."""


class RecordError(CSOError):
    """One raw log record is malformed; the message names the field. Such records go to quarantine."""


class StageError(CSOError):
    """A stage cannot run (e.g. no run selected yet)."""


class ToolError(CSOError):
    """An environment tool was called wrongly; the message becomes the observation."""


class SandboxError(CSOError):
    """The code sandbox itself cannot run (bad limits, no interpreter); sandboxed code's own errors are output."""


class URLRefusedError(ToolError):
    """A browser tool was asked for a URL outside the loopback site it may visit."""


class ParseError(CSOError):
    """A model's answer (PRM score, expert alternatives, error category) does not parse; never defaulted."""


class LLMError(CSOError):
    """A model call failed. `retryable` says whether sending the same request again may succeed."""

    retryable = False

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.headers = headers or {}


class LLMRequestError(LLMError):
    """The request itself was refused (HTTP 400/401/403/404/422) or cannot be built; never retried."""


class LLMTransientError(LLMError):
    """A failure that may pass: HTTP 5xx, a dropped connection, a malformed or truncated body."""

    retryable = True


class LLMRateLimitError(LLMTransientError):
    """The provider answered 429 (or 529, overloaded); `retry_after` holds its Retry-After in seconds."""


class LLMTimeoutError(LLMTransientError):
    """No complete answer arrived within the per-call timeout."""


class LLMResponseError(LLMTransientError):
    """The provider answered 2xx with a body that is not valid JSON or lacks the expected fields."""


class LLMBatchError(LLMError):
    """A provider batch cannot be submitted, found or read (failed, cancelled, file missing)."""


class ExportError(CSOError):
    """A pair cannot be written in a trainer's format (the message names the field)."""


class TrainError(CSOError):
    """The DPO training job cannot run as configured (no pairs, too many would be truncated, no tracker)."""
