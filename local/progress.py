"""Progress of long work: a tqdm bar on a terminal, plain log lines anywhere else.

Library code reports through a :class:`Progress` (``start`` / ``advance`` / ``line`` / ``close``);
the CLI picks the kind once, from whether stdout is a terminal. ``line`` passes a log line of the
job or server through unchanged (above the bar on a terminal, unless the bar was asked to hide them:
``python -m local train`` without ``-v`` shows the bar and ``event`` lines only, one per evaluation).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TextIO, TypeVar

from local.errors import EndpointError, HarnessError

T = TypeVar("T")

log = logging.getLogger(__name__)


class Progress:
    """Plain lines: job output goes to ``stream`` as is; milestones are logged at most every few seconds."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0):
        self.stream = stream
        self.every_s = every_s
        self.total: int | None = None
        self.unit = "it"
        self.desc = ""
        self.n = 0
        self._last = 0.0

    def start(self, total: int | None, unit: str = "it", desc: str = "") -> None:
        self.total, self.unit, self.desc, self.n = total, unit, desc, 0
        self._last = 0.0

    def set_total(self, total: int | None) -> None:
        """The total, once it is known (a training job tells its step count after reading its data)."""
        self.total = total

    def advance(self, n: int | None = None, **postfix: Any) -> None:
        """Move to ``n`` (absolute), or one further when ``n`` is None."""
        self.n = self.n + 1 if n is None else max(n, self.n)
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total is not None and self.n >= self.total):
            self._last = now
            of = f"/{self.total}" if self.total else ""
            extra = "".join(f" {k}={_fmt(v)}" for k, v in postfix.items())
            log.info("%s: %s %d%s%s", self.desc or "progress", self.unit, self.n, of, extra)

    def line(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

    def event(self, text: str) -> None:
        """A milestone worth a line of its own (an evaluation); plain output has it among the job's lines."""

    def close(self) -> None:
        pass


class TerminalProgress(Progress):
    """A tqdm bar on stderr; lines are written above it."""

    def __init__(self, stream: TextIO | None = None, raw_lines: bool = True):
        super().__init__(stream or sys.stdout)
        self.raw_lines = raw_lines  # False: while the bar runs, job lines are not shown (they are in its log file)
        self._bar: Any = None

    def start(self, total: int | None, unit: str = "it", desc: str = "") -> None:
        from tqdm import tqdm

        self.close()
        super().start(total, unit, desc)
        self._bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def set_total(self, total: int | None) -> None:
        super().set_total(total)
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, n: int | None = None, **postfix: Any) -> None:
        before = self.n
        self.n = self.n + 1 if n is None else max(n, self.n)
        if self._bar is not None:
            self._bar.update(self.n - before)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=True)

    def line(self, text: str) -> None:
        if self._bar is None:
            super().line(text)
            return
        if self.raw_lines:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)

    def event(self, text: str) -> None:
        if self._bar is not None and not self.raw_lines:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def for_stream(stream: TextIO, raw_lines: bool = True) -> Progress:
    """A bar when ``stream`` is a terminal (with the job's own lines above it when ``raw_lines``), plain lines
    otherwise."""
    isatty = getattr(stream, "isatty", None)
    return TerminalProgress(stream, raw_lines) if isatty is not None and isatty() else Progress(stream)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def each_in_pool(
    items: Sequence[T],
    one: Callable[[T], str | None],
    name: Callable[[T], str],
    workers: int,
    progress: Progress,
    what: tuple[str, str],
) -> tuple[int, list[tuple[str, str]]]:
    """``one`` on every item, ``workers`` at a time, the bar (``what``: its unit and name) advanced as each ends.

    ``one`` returns None when the item succeeded, else why it failed (an EndpointError or HarnessError it
    raises counts as its reason). Returns how many succeeded and each failure as (``name(item)``, why), sorted:
    a failed item is logged and the rest go on, as SageMaker's batch transform and async inference do."""
    succeeded, failures = 0, []
    progress.start(len(items), *what)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(one, item): item for item in items}
            for future in as_completed(futures):
                try:
                    why = future.result()
                except (EndpointError, HarnessError) as exc:
                    why = str(exc)
                if why is None:
                    succeeded += 1
                else:
                    failures.append((name(futures[future]), why))
                    log.error("%s: %s", failures[-1][0], why)
                progress.advance(succeeded + len(failures), failed=len(failures))
    finally:
        progress.close()
    return succeeded, sorted(failures)
