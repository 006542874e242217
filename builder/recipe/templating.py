"""Jinja2 for recipe values and ``files[].template`` sources, sandboxed and strict.

Templates see the variables (recipe ``vars``, ``--var-file``, ``--var``) and the build
facts; they cannot read files or reach Python internals. Environment variables are only
reachable through ``env("NAME")``, and only the names the recipe lists in ``env:`` or the
command line allows with ``--allow-env``: a third-party app cannot read the CI's secrets.
The names read (never the values) are recorded for the build manifest. The sandbox keeps
Jinja's stock ``range`` limit and bounds ``*`` and ``**``, so a template cannot make a
gigabyte string or a million-digit number.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import resource
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RESULT = 1 << 20  # characters or items a * or ** may make
MAX_RENDERED = 1 << 20  # characters one value may render to
RENDER_SECONDS = 10  # for all the templates of one recipe
RENDER_MEMORY = 256 << 20  # more address space the templates of one recipe may use


class TemplateError(ValueError):
    """A template failed: undefined variable, syntax error, sandbox violation."""


class _MissingEnv(Exception):
    pass


class OutOfTime(TemplateError):
    """The recipe's templates ran longer than RENDER_SECONDS."""


def _out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime(f"the recipe's templates ran longer than {RENDER_SECONDS} s")


def _address_space() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def rendering_budget(seconds: float | None = None, memory: int | None = None
                     ) -> Iterator[None]:
    """Bound what a recipe's templates can take: ``memory`` more address space (a filter
    like ``center(10**9)`` fails with MemoryError instead of exhausting the host) and
    ``seconds`` of time (nested loops), checked by SIGALRM where that can be used."""
    seconds, memory = seconds or RENDER_SECONDS, memory or RENDER_MEMORY
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + memory
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    timed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _out_of_time) if timed else None
    if timed:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _EnvNotAllowed(Exception):
    pass


@dataclass
class EnvAccess:
    """Which environment variables ``env()`` may read, and which it did read."""

    allowed: frozenset[str]
    read: set[str] = field(default_factory=set)


_ACCESS: contextvars.ContextVar[EnvAccess | None] = contextvars.ContextVar("env_access",
                                                                           default=None)


@contextlib.contextmanager
def environment_access(allowed: frozenset[str]) -> Iterator[EnvAccess]:
    """For the duration, ``env()`` may read the ``allowed`` names."""
    access = EnvAccess(allowed)
    token = _ACCESS.set(access)
    try:
        yield access
    finally:
        _ACCESS.reset(token)


def _env_function(name: str, default: str | None = None) -> str:
    access = _ACCESS.get()
    if access is None or name not in access.allowed:
        raise _EnvNotAllowed(str(name)[:40])
    access.read.add(name)
    value = os.environ.get(name, default)
    if value is None:
        raise _MissingEnv(name)
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with ``*`` and ``**`` bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and isinstance(left, int) and \
                abs(left) > 1 and right * max(abs(left).bit_length(), 1) > MAX_RESULT * 3:
            raise TemplateError("the number is too large")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(count, int) and \
                        len(sequence) * count > MAX_RESULT:
                    raise TemplateError("the result is too large")
        return super().call_binop(context, operator, left, right)


def make_environment() -> jinja2.Environment:
    environment = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False,
                           keep_trailing_newline=True)
    environment.globals["env"] = _env_function  # the stock globals keep the range limit
    return environment


_ENVIRONMENT = make_environment()


def needs_rendering(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def render(text: str, variables: dict[str, Any]) -> str:
    """Render one template string; every failure is a TemplateError with a plain message."""
    if not needs_rendering(text):
        return text
    try:
        result = _ENVIRONMENT.from_string(text).render(variables)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"undefined variable: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"not allowed in a template: {exc}") from None
    except _MissingEnv as exc:
        raise TemplateError(
            f"environment variable {exc.args[0]} is not set "
            f"(use env(\"{exc.args[0]}\", \"default\") for a default)") from None
    except _EnvNotAllowed as exc:
        raise TemplateError(
            f"env({exc.args[0]!r}) is not allowed: list {exc.args[0]} in the recipe's env: "
            f"or pass --allow-env {exc.args[0]}") from None
    except TemplateError:
        raise
    except RecursionError:
        raise TemplateError("template error: recursion too deep") from None
    except MemoryError:
        raise TemplateError("template error: out of memory") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"template error: {str(exc)[:200]}") from None
    if len(result) > MAX_RENDERED:
        raise TemplateError(f"renders to more than {MAX_RENDERED} characters")
    return result
