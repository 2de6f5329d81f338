"""Credentials never leave the process: finding them, and scrubbing them from text, dicts and streams.

distill holds no credential itself (huggingface_hub and wandb read their own), but a value that
looks like one can still reach a file or a log: a token pasted into a recipe value, a Hub error
quoting a URL, a library logging its environment. Every path out is scrubbed: the resolved
recipe, the W&B config, the model card, the CLI's error line, and stdout/stderr themselves while
a command runs (`scrubbed_streams`). A credential is: the value of a known token variable
(HF_TOKEN, WANDB_API_KEY, ...), of any variable whose name ends in TOKEN/SECRET/PASSWORD/API_KEY
/ACCESS_KEY, the Hub login file's token, and anything shaped like a Hub token (hf_...).
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

REDACTED = "<redacted>"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY")
# A whole name part: HF_TOKEN, WANDB_API_KEY, hub_token, but not shard_tokens or max_new_tokens.
_SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_?key|access_?key)$", re.I)
_HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")  # a Hub token: hf_ and 34 letters and digits


def secret_values() -> set[str]:
    """Credential values this process could leak: the known variables, any *TOKEN*/*KEY*-like variable,
    and the Hub login file's token (read as a file: no refresh, no network)."""
    values = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    values |= {v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8}
    try:
        from huggingface_hub import constants

        path = Path(constants.HF_TOKEN_PATH)
        if path.is_file():
            values.add(path.read_text().strip())
    except (ImportError, OSError, AttributeError):
        pass
    return {v for v in values if len(v) >= 8}  # a short value would redact ordinary words


def scrub(text: str, secrets: set[str] | None = None) -> str:
    for value in sorted(secret_values() if secrets is None else secrets, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _HUB_TOKEN.sub(REDACTED, text)


def redact(obj, secrets: set[str] | None = None):
    """A copy of `obj` (the recipe as a dict) with credential-like values replaced."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and obj[k] not in (None, "", False)
                else redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, secrets) for v in obj]
    return scrub(obj, secrets) if isinstance(obj, str) else obj


class _Scrubbing(io.TextIOBase):
    """A text stream that scrubs credentials from what it passes on (line by line: a credential is
    never split across two writes of one line)."""

    def __init__(self, inner, secrets: set[str]):
        self.inner, self.secrets, self._pending = inner, secrets, ""
        self._lock = threading.Lock()  # W&B and logging write from their own threads

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            if "\n" in self._pending or "\r" in self._pending:
                cut = max(self._pending.rfind("\n"), self._pending.rfind("\r")) + 1
                self.inner.write(scrub(self._pending[:cut], self.secrets))
                self._pending = self._pending[cut:]
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.inner.write(scrub(self._pending, self.secrets))
                self._pending = ""
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self):
        return getattr(self.inner, "encoding", "utf-8")


@contextmanager
def scrubbed_streams():
    """sys.stdout and sys.stderr scrubbed of credentials for the duration (the CLI wraps each
    command in it). Output written to the file descriptors directly (a C extension, a child
    process) is not covered; distill starts no child that prints credentials."""
    secrets = secret_values()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Scrubbing(sys.stdout, secrets), _Scrubbing(sys.stderr, secrets)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
