"""User-facing errors.

A `DistillError` is a mistake in the user's input (recipe, data, model path,
cache). The CLI prints its message on one line and exits with status 2, never
a traceback. Anything else is a bug in distill and keeps its traceback.
"""


class DistillError(Exception):
    """A user mistake: bad recipe, bad data, bad path, corrupt artifact."""


class ConfigError(DistillError):
    """A recipe key has a bad value. The message names the key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")
        self.key, self.message, self.source = key, message, source


class CacheError(DistillError):
    """The teacher cache is missing, corrupt, or does not match the recipe."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError, or Python's MemoryError."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
        or any(t in str(exc) for t in ("can't allocate memory", "CUDA out of memory", "out of memory"))
