"""The Jinja2 templates amiforge itself renders (fstab, grub.cfg, apt sources, ...).

They live in the top-level ``templates/`` folder of a source checkout and are installed as
``builder/templates`` in a wheel. These are amiforge's own, trusted templates; recipe
values and recipe templates go through the sandbox in :mod:`builder.recipe.templating`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2


def templates_dir() -> Path:
    package = Path(__file__).resolve().parent
    for candidate in (package / "templates", package.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("amiforge's templates folder is missing from the installation")


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)
