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
    timings: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        started = time.monotonic()
        suffix = f" ({detail})" if detail else ""
        if self.stream.isatty() and not self.quiet:
            print(f"==> {name}{suffix} ...", file=self.stream, flush=True)
        try:
            yield
        except BaseException:
            elapsed = time.monotonic() - started
            self.timings[name] = round(elapsed, 3)
            self.say(f"==> {name:<11} FAILED after {elapsed:.1f}s")
            raise
        elapsed = time.monotonic() - started
        self.timings[name] = round(elapsed, 3)
        self.say(f"==> {name:<11} {elapsed:6.1f}s{suffix}")
