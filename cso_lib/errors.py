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
