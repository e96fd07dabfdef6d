"""Typed exceptions. Every native boundary (libc, CUDA, Wasmtime) raises one of these."""


class DriftwoodError(Exception):
    """Base class of every error Driftwood raises on purpose."""


class ArenaError(DriftwoodError):
    """An arena operation failed (mapping, growth past its limit, use after close)."""


class BackendError(DriftwoodError):
    """An accelerator backend failed (driver call, registration, unavailable device)."""


class BuildError(DriftwoodError):
    """A guest failed to compile."""


class ModelError(DriftwoodError):
    """A model could not be found, parsed or run (missing file, unsupported architecture)."""


class GuestError(DriftwoodError):
    """A guest module could not be loaded, linked or run."""


class GuestTrap(GuestError):
    """The guest trapped (unreachable, out-of-bounds access, stack overflow, ...)."""

    def __init__(self, message: str, backtrace: str = "") -> None:
        super().__init__(message)
        self.backtrace = backtrace


class LimitExceeded(GuestError):
    """The guest ran past its fuel, time or memory limit."""


class SnapshotError(DriftwoodError):
    """A snapshot is malformed, tampered with, or does not fit what it is restored into."""


class UnsupportedModel(ModelError):
    """A model file uses an architecture, tensor type or tokenizer the engine does not run."""


class ContextFull(ModelError):
    """A session's KV cache has no room for the tokens asked of it."""
