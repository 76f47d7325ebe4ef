"""The command line's progress bar: tqdm on stderr.

On a terminal tqdm redraws one line. Elsewhere (a log file, CI) a carriage-return stream would be
one endless line, so the same bar is written as whole lines, at most one every few seconds.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

# No elapsed/remaining times: identical states give identical lines, which the log form drops.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar:30}| {n_fmt}/{total_fmt}{unit}{postfix}"


class _Lines:
    """A file for tqdm that turns each redraw into a line of its own (and drops a repeated one)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """A bar counting to ``total``; ``unit`` "MB" shows bytes scaled (kB, MB, GB), anything else counts."""

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None,
                 every_s: float = 5.0) -> None:
        stream = stream or sys.stderr
        tty = stream.isatty()
        scaled = unit == "MB"
        self.total = max(total, 1)
        self.note = ""
        self.bar = tqdm(total=self.total, desc=label, file=stream if tty else _Lines(stream),
                        unit="B" if scaled else f" {unit}", unit_scale=scaled, bar_format=BAR_FORMAT,
                        mininterval=0.1 if tty else every_s, ascii=True if not tty else None, leave=True)

    @property
    def value(self) -> int:
        return int(self.bar.n)

    def set(self, value: int, note: str | None = None) -> None:
        """Move to ``value`` (back too: a retried upload starts its batch again), with a note after the count."""
        if note is not None and note != self.note:
            self.note = note
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(min(value, self.total) - self.bar.n)

    def advance(self, n: int) -> None:
        self.set(self.value + n)

    def finish(self) -> None:
        self.bar.close()
