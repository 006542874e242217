"""What a person watching the terminal sees: one line per stage with its duration."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    stream: TextIO = sys.stderr
    quiet: bool = False
    prefix: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[Stage]:
        """Time a stage; the block may set ``.source`` ("cache", "not needed", ...)."""
        started = time.monotonic()
        handle = Stage(name)
        if self.stream.isatty() and not self.quiet:
            print(f"==> {name} ...", file=self.stream, flush=True)
        try:
            yield handle
        except BaseException:
            elapsed = time.monotonic() - started
            self.timings[name] = round(elapsed, 3)
            self.say(f"==> {self.prefix}{name:<11} FAILED after {elapsed:.1f}s")
            raise
        elapsed = time.monotonic() - started
        self.timings[name] = round(elapsed, 3)
        self.sources[name] = handle.source
        notes = ", ".join(n for n in (detail, "" if handle.source == "built" else handle.source)
                          if n)
        self.say(f"==> {self.prefix}{name:<11} {elapsed:6.1f}s" + (f" ({notes})" if notes else ""))

    def report(self) -> dict[str, dict[str, object]]:
        return {name: {"seconds": seconds, "source": self.sources.get(name, "built")}
                for name, seconds in self.timings.items()}


@dataclass
class Stage:
    name: str
    source: str = "built"
