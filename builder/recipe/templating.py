"""Jinja2 for recipe values and ``files[].template`` sources, sandboxed and strict.

Templates see the variables (recipe ``vars``, ``--var-file``, ``--var``) and the build
facts; they cannot read files or reach Python internals. Environment variables are only
reachable through ``env("NAME")`` so a recipe says what it reads.
"""

from __future__ import annotations

import os
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A template failed: undefined variable, syntax error, sandbox violation."""


class _MissingEnv(Exception):
    pass


def _env_function(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise _MissingEnv(name)
    return value


def make_environment() -> jinja2.Environment:
    environment = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    environment.globals = {"env": _env_function, "range": range}
    return environment


_ENVIRONMENT = make_environment()


def needs_rendering(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def render(text: str, variables: dict[str, Any]) -> str:
    """Render one template string; every failure is a TemplateError with a plain message."""
    if not needs_rendering(text):
        return text
    try:
        return _ENVIRONMENT.from_string(text).render(variables)
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
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"template error: {exc}") from None
