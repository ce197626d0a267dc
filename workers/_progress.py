"""A progress bar on stderr, drawn only when stderr is a terminal (never into logs or pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """Redraws at most ten times a second; a no-op when the stream is not a terminal."""

    def __init__(
        self, label: str, total_bytes: int = 0, total_items: int = 1, stream: TextIO | None = None
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._label = label
        self._total_bytes = max(total_bytes, 1)
        self._total_items = total_items
        self._began = time.monotonic()
        self._drawn_at = 0.0

    def update(
        self,
        items_done: int,
        bytes_done: int,
        *,
        total_bytes: int | None = None,
        total_items: int | None = None,
        force: bool = False,
    ) -> None:
        if not self.enabled:
            return
        if total_bytes is not None:
            self._total_bytes = max(total_bytes, 1)
        if total_items is not None:
            self._total_items = total_items
        now = time.monotonic()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        fraction = min(bytes_done / self._total_bytes, 1.0)
        elapsed = max(now - self._began, 1e-6)
        rate = bytes_done / elapsed
        eta = (self._total_bytes - bytes_done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(fraction * width)
        bar = "#" * filled + "-" * (width - filled)
        items = f" {items_done}/{self._total_items}" if self._total_items > 1 else ""
        self._stream.write(
            f"\r{self._label} [{bar}] {fraction:4.0%}{items} {_human(bytes_done)}"
            f" {_human(rate)}/s ETA {eta:4.0f}s "
        )
        self._stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._stream.write("\n")
            self._stream.flush()
