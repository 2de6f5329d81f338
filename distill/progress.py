"""Progress bars that stay readable in a log file or CI: every bar distill shows goes through here.

    bar = progress(total=400, desc="train", unit="steps", initial=0, disable=not main)
    bar.update(1)
    bar.set_postfix(loss="1.2340", tok_s="52")
    bar.close()

When stderr is a terminal this is a tqdm bar. Otherwise (a log file, a CI runner, a pipe) a
bar's carriage-return redraws would be thousands of lines, so it prints a plain line instead,
at most every `every_s` seconds (PLAIN_EVERY_S) and once at the end, with the same postfix:

    train: 120/400 steps (30%), loss 1.2340, tok_s 52, 2m10s elapsed

`quiet_library_bars()` (called by the CLI before a stage) turns off transformers' and the Hub's
own bars ("Loading weights", downloads) when stderr is not a terminal, through their APIs.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TextIO

PLAIN_EVERY_S = 30.0


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class PlainProgress:
    """tqdm's update/set_postfix/close, written as a plain line every `every_s` seconds and at close."""

    def __init__(self, total: Optional[int], desc: str, unit: str, initial: int = 0, disable: bool = False,
                 every_s: float = PLAIN_EVERY_S, stream: Optional[TextIO] = None):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
        self.every_s, self.stream = every_s, stream
        self.postfix: dict[str, object] = {}
        self.start = self.last = time.monotonic()
        self.closed = False

    def line(self) -> str:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {count} {self.unit}{pct}{extra}, {_duration(time.monotonic() - self.start)} elapsed"

    def _print(self) -> None:
        self.last = time.monotonic()
        print(self.line(), file=self.stream or sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.last >= self.every_s:
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if not self.disable and not self.closed:
            self._print()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
             disable: bool = False, leave: bool = True, every_s: float = PLAIN_EVERY_S,
             stream: Optional[TextIO] = None):
    """A tqdm bar on a terminal, else a PlainProgress; both take update(n), set_postfix(**kw), close()."""
    out = stream or sys.stderr
    if _is_tty(out):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave, file=out)
    return PlainProgress(total, desc, unit, initial, disable, every_s, stream)


def track(iterable: Iterable, total: Optional[int] = None, **kwargs) -> Iterator:
    """Iterate `iterable` with a progress(...) bar (total: len(iterable) when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = progress(total=total, **kwargs)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def quiet_library_bars(stream: Optional[TextIO] = None) -> None:
    """Off with transformers' and huggingface_hub's progress bars when `stream` (stderr) is no terminal."""
    if _is_tty(stream or sys.stderr):
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
