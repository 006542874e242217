"""The command line: ``build RECIPE`` and its subcommands. This is the only place that turns
errors into messages and exit codes: 0 ok, 1 build failed, 2 bad input, 130 interrupted."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from builder.commands.args import configure_logging as _logging
from builder.commands.aws import (
    cmd_copy,
    cmd_deregister,
    cmd_launch,
    cmd_publish,
    cmd_share,
    cmd_verify_snapshot,
)
from builder.commands.images import cmd_audit, cmd_boot, cmd_cache, cmd_diff, cmd_unbundle
from builder.commands.recipes import SUBCOMMAND_HELP, cmd_build, cmd_plan, cmd_schema, cmd_validate
from builder.errors import AmiforgeError, Interrupted, RecipeError

EXIT_INTERRUPTED = 130
__all__ = ["SUBCOMMANDS", "SUBCOMMAND_HELP", "_logging", "main"]

AWS_COMMANDS = ("publish", "share", "copy", "deregister", "verify-snapshot", "launch")
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "schema": cmd_schema,
    "boot": cmd_boot,
    "unbundle": cmd_unbundle,
    "cache": cmd_cache,
    "audit": cmd_audit,
    "diff": cmd_diff,
    "publish": cmd_publish,
    "share": cmd_share,
    "verify-snapshot": cmd_verify_snapshot,
    "copy": cmd_copy,
    "launch": cmd_launch,
    "deregister": cmd_deregister,
}


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGINT and SIGTERM interrupt a build (cleanly), even where the parent started us with
    # SIGINT ignored, as shells do for background jobs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    try:
        if command is not None and argv[0] in AWS_COMMANDS:
            from builder.aws.session import aws_errors

            with aws_errors():
                return command(argv[1:])
        if command is not None:
            return command(argv[1:])
        return cmd_build(argv)
    except BrokenPipeError:  # `build plan | head`: the reader has all it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("error: interrupted; temporary files were removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted:
        return EXIT_INTERRUPTED
    except RecipeError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except AmiforgeError as exc:
        lines = exc.lines()
        print(f"error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return exc.exit_code
