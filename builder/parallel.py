"""Several recipes at once (``build A.yaml B.yaml -j 2``): each build runs in a process of
its own, so a failure or a crash of one cannot stop or corrupt another; they share the
stage cache (a bootstrap two recipes need is made once, under its lock). Progress lines are
prefixed with the recipe's name, and one summary closes the run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.host.run import start, stop


@dataclass
class Job:
    recipe: Path
    output_dir: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seconds: float = 0.0
    summary: dict[str, object] = field(default_factory=dict)
    returncode: int | None = None


def _relay(job: Job, stream: object) -> None:
    prefix = f"[{job.recipe.stem}] "
    for raw in stream:  # type: ignore[attr-defined]
        print(prefix + raw.decode(errors="replace").rstrip("\n"), file=sys.stderr, flush=True)


def _start(job: Job) -> threading.Thread:
    job.started = time.monotonic()
    job.process = start([sys.executable, "-m", "builder", *job.argv])
    relay = threading.Thread(target=_relay, args=(job, job.process.stderr), daemon=True)
    relay.start()
    return relay


def _finish(job: Job, relay: threading.Thread) -> None:
    assert job.process is not None
    out = job.process.stdout.read() if job.process.stdout else b""
    job.returncode = job.process.wait()
    relay.join()
    job.seconds = time.monotonic() - job.started
    try:
        job.summary = json.loads(out or b"{}")
    except json.JSONDecodeError:
        job.summary = {}


def run_jobs(jobs: Sequence[Job], parallel: int) -> int:
    """Run the builds, ``parallel`` at a time; return the worst exit code."""
    queue, running = list(jobs), []
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while queue or running:
            while queue and len(running) < parallel:
                job = queue.pop(0)
                running.append((job, _start(job)))
            time.sleep(0.2)
            for job, relay in list(running):
                if job.process is not None and job.process.poll() is not None:
                    _finish(job, relay)
                    running.remove((job, relay))
    except KeyboardInterrupt:
        for job, _ in running:
            if job.process is not None:
                job.process.send_signal(signal.SIGINT)
        for job, relay in running:
            if job.process is not None:
                try:
                    job.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    stop(job.process)
                job.returncode = 130
                relay.join(timeout=5)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(jobs)
    return _worst(job.returncode for job in jobs)


def _worst(codes: object) -> int:
    codes = [c for c in codes if c is not None]  # type: ignore[attr-defined]
    if not codes or all(c == 0 for c in codes):
        return 0
    for code in (130, 1, 2):
        if code in codes:
            return code
    return 1


def _print_summary(jobs: Sequence[Job]) -> None:
    print("==> summary", file=sys.stderr)
    for job in jobs:
        status = {0: "ok", 1: "FAILED", 2: "BAD INPUT", 130: "INTERRUPTED"}.get(
            job.returncode or 0, f"exit {job.returncode}")
        print(f"    {job.recipe.stem:<32} {status:<11} {job.seconds:6.1f}s  {job.output_dir}/",
              file=sys.stderr)
