"""The one error hierarchy. Library code raises these; only the CLI turns them into
messages and exit codes (0 ok, 1 build failed, 2 bad input, 130 interrupted)."""

from __future__ import annotations

from dataclasses import dataclass


class AmiforgeError(Exception):
    """Base of every error amiforge expects and reports without a traceback."""

    exit_code = 1

    def lines(self) -> list[str]:
        return [str(self)]


class InputError(AmiforgeError):
    """Bad input: a recipe, a variable, an argument, a file named on the command line."""

    exit_code = 2


@dataclass(frozen=True, order=True)
class Location:
    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One located problem in a recipe: where, which key, what is wrong."""

    location: Location
    path: str
    message: str

    def __str__(self) -> str:
        key = f" {self.path}:" if self.path else ""
        return f"{self.location}:{key} {self.message}"


class RecipeError(InputError):
    """One or more problems in a recipe, all reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.location, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class ToolMissing(AmiforgeError):
    """A program amiforge needs is not installed."""

    def __init__(self, missing: list[tuple[str, str, str]]):
        self.missing = missing
        names = ", ".join(name for name, _, _ in missing)
        super().__init__(f"missing programs: {names}")

    def lines(self) -> list[str]:
        out = [f"{name} is needed for {purpose} (install: apt-get install {package})"
               for name, purpose, package in self.missing]
        return [*out, "hint: `make deps` installs every package amiforge needs"]


class ToolFailed(AmiforgeError):
    """An external program exited non-zero; carries the tail of its output."""

    def __init__(self, argv: list[str], returncode: int, output: str):
        self.argv = argv
        self.returncode = returncode
        self.output = output
        super().__init__(f"{argv[0]} failed with exit code {returncode}")

    def tail(self, lines: int = 15) -> list[str]:
        return self.output.rstrip().splitlines()[-lines:]

    def lines(self) -> list[str]:
        return [str(self), *("  | " + line for line in self.tail())]


class BuildFailed(AmiforgeError):
    """The build could not complete for a reason that is not a tool's exit code."""


class Interrupted(AmiforgeError):
    """SIGINT or SIGTERM arrived; cleanup ran."""

    exit_code = 130
