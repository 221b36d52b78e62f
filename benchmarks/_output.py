"""Where a benchmark's printout goes: the terminal and, with ``--out``, a results file."""

from __future__ import annotations

import io
from typing import TextIO


class Tee(io.TextIOBase):
    """Writes every line to each stream and flushes, so a long study's results file is
    complete up to the last line even if the run is stopped."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)
