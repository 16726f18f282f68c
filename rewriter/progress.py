"""Progress bars for the slow steps (tracing, checking many sites, exporting).

tqdm on stderr, shown only on a terminal (CI logs stay clean) and never when quiet.  A bar
over many items appears once it has lasted :data:`DELAY` seconds, so quick loops print
nothing; a bar over the named steps of a slow job (load, trace, export) appears at once,
since a single long step gives tqdm no later moment to show it.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

#: seconds a bar waits before it appears
DELAY = 1.0

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or allow) every progress bar in this process; the CLI's ``--quiet`` sets it."""
    global _quiet
    _quiet = quiet


def bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        delay: float | None = None) -> tqdm:
    # disable=None lets tqdm hide the bar when stderr is not a terminal
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                delay=DELAY if delay is None else delay, disable=True if _quiet else None)


@contextlib.contextmanager
def steps(desc: str, names: Sequence[str]) -> Iterator:
    """A bar over the named steps of one job; call the yielded ``step(name)`` as each one starts."""
    with bar(desc=desc, total=len(names), unit="step", delay=0) as progress:
        started = []

        def step(name: str) -> None:
            if started:
                progress.update(1)
            started.append(name)
            progress.set_postfix_str(name)

        yield step
        if started:
            progress.update(1)
