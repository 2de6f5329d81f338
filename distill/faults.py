"""Kill points: where the reliability tests make a real run die with SIGKILL at an exact moment.

Killing a process from outside at a random time rarely lands inside a write that takes
milliseconds, so the tests (tests/test_reliability_kill.py) also name the moment:

    DISTILL_KILL_AT=write:manifest.json:3      # the 3rd manifest write, after its content, before its rename
    DISTILL_KILL_AT=checkpoint:saved:2         # the 2nd checkpoint, its state written, not yet sealed
    DISTILL_KILL_AT=checkpoint:renamed:2       # the 2nd checkpoint in place, the older ones not yet pruned
    DISTILL_KILL_AT=student:saved:1            # the student written under its temporary name, not renamed

The process kills itself with SIGKILL (no cleanup, no atexit), as the kernel or a preempted
machine would. Unset, a kill point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def kill_point(site: str) -> None:
    spec = os.environ.get("DISTILL_KILL_AT")
    if not spec:
        return
    want, _, n = spec.rpartition(":")
    if want != site:
        return
    _seen[site] = _seen.get(site, 0) + 1
    if _seen[site] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
