"""Progress of long commands on stderr: drawn by tqdm, only on a terminal, from one set of figures.

Why tqdm (over rich, or the bar hotcopy drew itself): it is one small pure-Python package with
no dependencies of its own, made for exactly this (a one-line meter on stderr); it re-reads the
terminal's width at every frame and fits the line to it (wide characters and all), redraws in
place without leaving wrapped lines behind, and falls back to ASCII where the stream cannot
show block characters. rich would bring a console framework (pygments, markdown-it) and a
refresh thread to draw one line.

What tqdm does not decide here: the figures. :class:`Figures` is the one source of the
percentage, the rate and the ETA, for the bar and for the summary a command prints when it is
done (so they cannot disagree); the last frame is drawn from the figures of the finished work,
whatever was throttled before it; and nothing is drawn unless stderr is a terminal and the
command was not told ``--quiet``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Figures", "Progress", "human_bytes", "human_seconds"]

REDRAW_EVERY = 0.1  # seconds between frames at most ten a second; the last frame is always drawn


def human_bytes(n: float) -> str:
    """``n`` bytes for a person: ``512 B``, ``1.5 KiB``, ``12.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """``0.42 s``, ``12.3 s``, ``2:05`` (minutes), ``1:02:05`` (hours)."""
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class Figures:
    """Where a long command stands: the one source of a bar's percentage, rate and ETA and of
    the summary printed when the work is done.

    Attributes:
        items: Items finished (prefixes, files, backups).
        items_total: Items to do.
        bytes: Bytes done.
        bytes_total: Bytes to do (an estimate until the work is done).
        seconds: Seconds of work so far, waits for leases and locks left out.
        finished: The work is over: the figures are the final ones.
    """

    items: int = 0
    items_total: int = 0
    bytes: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    finished: bool = False

    @property
    def fraction(self) -> float:
        """Done, from 0 to 1: by bytes when there are any to do, else by items."""
        if self.finished:
            return 1.0
        if self.bytes_total > 0:
            return min(self.bytes / self.bytes_total, 1.0)
        if self.items_total > 0:
            return min(self.items / self.items_total, 1.0)
        return 0.0

    @property
    def rate(self) -> float | None:
        """Bytes per second over the whole work so far (no smoothing), None before a byte."""
        return self.bytes / self.seconds if self.bytes and self.seconds > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at :attr:`rate`, None when unknown or done."""
        rate = self.rate
        if self.finished or rate is None:
            return None
        return max(self.bytes_total - self.bytes, 0) / rate

    def rate_text(self) -> str:
        rate = self.rate
        return "-" if rate is None else f"{human_bytes(rate)}/s"

    def stats(self, unit: str, width: int | None = None) -> str:
        """What a bar shows right of it: items, bytes, rate, and the ETA (or the time taken);
        the longest form that fits in ``width`` characters (any width: the longest)."""
        items = f"{self.items}/{self.items_total}" if self.items_total else ""
        named = f"{items} {unit}, " if items else ""
        short = f"{items}, " if items else ""
        done = human_bytes(self.bytes)
        if self.finished:
            took = human_seconds(self.seconds)
            forms = [
                f"{named}{done} in {took}, {self.rate_text()}",
                f"{named}{done}, {self.rate_text()}",
                f"{short}{done}, {self.rate_text()}",
                f"{short}{done}",
            ]
        else:
            eta = self.eta
            left = "" if eta is None else f", ETA {human_seconds(eta)}"
            of = f"{done}/{human_bytes(self.bytes_total)}"
            forms = [
                f"{named}{of}, {self.rate_text()}{left}",
                f"{named}{of}{left}",
                f"{short}{of}{left}",
                f"{short}{done}",
            ]
        if width is None:
            return forms[0]
        return next((form for form in forms if len(form) <= width), forms[-1])


class _Line(tqdm):  # type: ignore[type-arg]
    """tqdm drawing a :class:`Progress`'s figures: its own counters and clock are not used."""

    monitor_interval = 0  # no monitor thread: frames are drawn when the figures change

    def __init__(self, figures: Figures, unit: str, **options: Any) -> None:
        self.figures = figures
        self.unit_name = unit
        super().__init__(**options)
        shape = self.dynamic_ncols  # tqdm's: the terminal's size, read at every frame

        def fitted(stream: Any) -> tuple[int, int]:
            """The size, or 80 x 24 for a terminal that tells none (a fresh pty says 0 x 0)."""
            columns, rows = shape(stream) if callable(shape) else (0, 0)
            return (columns or 0) if (columns or 0) > 0 else 80, rows if (rows or 0) > 0 else 24

        self.dynamic_ncols = fitted  # type: ignore[assignment]  # a function at run time too
        self.ncols, self.nrows = fitted(self.fp)

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        base = super().format_dict
        figures = self.figures
        # Room for the figures: the width less the label, the percentage and a bar of ten.
        room = base["ncols"] - len(self.desc) - 18
        base.update(
            n=figures.fraction,
            total=1.0,
            elapsed=figures.seconds,
            rate=None,
            stats=figures.stats(self.unit_name, room),
        )
        return base


class Progress:
    """A progress bar for one long command; a no-op unless ``stream`` is a terminal.

    Feed it with :meth:`update`; end it with :meth:`finish` (the last frame, exact) or, on
    failure, :meth:`abandon` (the line is cleared, so an error message starts on a clean line).
    As a context manager it abandons the bar on an exception and finishes it otherwise (from
    the last figures given, unless :meth:`finish` was called).

    Args:
        label: What is being done (``backup``, ``restore``, ``verify``, ``copy p``).
        unit: What the items are (``prefixes``, ``files``, ``backups``).
        quiet: Draw nothing (``--quiet``).
        stream: Where to draw (default stderr).
        clock: Monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        label: str,
        unit: str = "prefixes",
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and self._stream.isatty()
        self._clock = clock
        self._began: float | None = None
        self._drawn_at = 0.0
        self.figures = Figures()
        self._label = label
        self._unit = unit
        self._line: _Line | None = None
        self._ended = False

    def update(self, items: int, items_total: int, done_bytes: int, total_bytes: int) -> None:
        """New figures; redrawn at most every :data:`REDRAW_EVERY` seconds."""
        now = self._clock()
        if self._began is None:  # the work starts with its first figures (waits are over)
            self._began = now
        self._set(Figures(items, items_total, done_bytes, total_bytes, now - self._began))
        if now - self._drawn_at >= REDRAW_EVERY:
            self._drawn_at = now
            self._draw()

    def finish(self, items: int, items_total: int, done_bytes: int, seconds: float) -> Figures:
        """Draw the last frame from the finished work's own figures and end the line.

        ``done_bytes`` and ``seconds`` are the ones the command's summary prints: the last
        frame shows them exactly, at 100 %. Returns the figures (for the summary).
        """
        figures = Figures(items, items_total, done_bytes, done_bytes, seconds, finished=True)
        self._set(figures)
        self._end(leave=True)
        return figures

    def abandon(self) -> None:
        """Clear the line and end the bar: what follows (an error) starts on a clean line."""
        self._end(leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.abandon()
        elif not self._ended:
            done = self.figures
            self.finish(done.items, done.items_total, done.bytes, done.seconds)

    def _set(self, figures: Figures) -> None:
        self.figures = figures
        if self._line is not None:
            self._line.figures = figures

    def _draw(self) -> None:
        """Draw the current figures, opening the line at the first frame (a command that
        fails before its work starts draws nothing)."""
        if not self.enabled or self._ended:
            return
        if self._line is None:
            self._line = _Line(
                self.figures,
                self._unit,
                desc=self._label,
                file=self._stream,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {stats}",
                dynamic_ncols=True,  # the terminal's width, read again at every frame
                mininterval=0,
                total=1.0,
            )
        self._line.figures = self.figures
        self._line.refresh()

    def _end(self, *, leave: bool) -> None:
        if leave:
            self._draw()  # the last frame, even if nothing was drawn before
        self._ended = True
        line, self._line = self._line, None
        if line is not None:
            line.leave = leave
            line.close()  # leave: draws the last frame again and ends the line
